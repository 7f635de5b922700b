//! A bounded pool of what a connection needs only while bytes are in flight: the
//! splice path's pipes and the kernel path's forwarding buffer. A direction takes one
//! when its source has something to read and gives it back when the source has
//! nothing more, so an idle connection holds neither descriptors nor buffers beyond
//! its two sockets (`docs/performance.md`, "Idle connections").
//!
//! Only empty items come back (a pipe holding bytes is dropped with its
//! connection, never reused). At most `max` idle items are kept; more are freed.
use std::sync::{Mutex, PoisonError};

/// Idle items kept for reuse, at most `max` of them.
pub struct Pool<T> {
    idle: Mutex<Vec<T>>,
    max: usize,
}

impl<T> Pool<T> {
    /// An empty pool keeping at most `max` idle items.
    pub const fn new(max: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max,
        }
    }

    /// An idle item, or a new one from `make`.
    pub fn take<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let reused = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        reused.map_or_else(make, Ok)
    }

    /// Gives an empty item back; freed when the pool already keeps `max`.
    pub fn give(&self, item: T) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max {
            idle.push(item);
        }
    }

    /// Idle items kept now.
    pub fn idle(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_what_was_given_back_and_keeps_at_most_max() {
        let pool = Pool::new(2);
        let mut count = 0;
        let mut next = || {
            count += 1;
            Ok::<_, ()>(count)
        };
        let a = pool.take(&mut next).expect("a");
        let b = pool.take(&mut next).expect("b");
        let c = pool.take(&mut next).expect("c");
        assert_eq!((a, b, c), (1, 2, 3));
        pool.give(a);
        pool.give(b);
        pool.give(c);
        assert_eq!(pool.idle(), 2, "the third is freed");
        assert_eq!(pool.take(&mut next), Ok(2), "last given back, first taken");
        assert_eq!(pool.take(&mut next), Ok(1));
        assert_eq!(pool.take(&mut next), Ok(4), "empty pool makes a new one");
    }

    #[test]
    fn a_failing_make_is_returned() {
        let pool: Pool<u8> = Pool::new(1);
        assert_eq!(pool.take(|| Err("no")), Err("no"));
    }
}
