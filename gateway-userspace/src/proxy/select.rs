//! Backend selection: smooth weighted round robin (as nginx's `upstream` does).
//!
//! Every pick adds each candidate's weight to its running score, takes the highest
//! score, and subtracts the total weight from the winner. Over any window of
//! `sum(weights)` picks each backend is chosen exactly `weight` times, spread evenly,
//! with no randomness: a weight-0 backend is never chosen. Retries pass the indexes
//! that already failed in `exclude`.

/// Selection state of one listener's backend list.
#[derive(Clone, Debug, Default)]
pub struct Swrr {
    weights: Vec<u32>,
    current: Vec<i64>,
}

impl Swrr {
    /// A selector over `weights` (one per backend, in map order).
    pub fn new(weights: Vec<u32>) -> Self {
        let current = vec![0; weights.len()];
        Self { weights, current }
    }

    /// The weights this selector was built from.
    pub fn weights(&self) -> &[u32] {
        &self.weights
    }

    /// Picks a backend index, skipping weight-0 backends and those in `exclude`;
    /// `None` when no candidate is left.
    pub fn pick(&mut self, exclude: &[usize]) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (i, &w) in self.weights.iter().enumerate() {
            if w == 0 || exclude.contains(&i) {
                continue;
            }
            let w = i64::from(w);
            self.current[i] += w;
            total += w;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        self.current[best] -= total;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(weights: &[u32], picks: usize) -> Vec<usize> {
        let mut s = Swrr::new(weights.to_vec());
        let mut c = vec![0; weights.len()];
        for _ in 0..picks {
            c[s.pick(&[]).expect("a candidate")] += 1;
        }
        c
    }

    #[test]
    fn exact_shares_over_a_window() {
        assert_eq!(counts(&[1, 2, 0], 3000), vec![1000, 2000, 0]);
        assert_eq!(counts(&[5, 1, 1], 700), vec![500, 100, 100]);
    }

    #[test]
    fn spreads_picks() {
        let mut s = Swrr::new(vec![5, 1, 1]);
        let seq: Vec<_> = (0..7).map(|_| s.pick(&[]).expect("pick")).collect();
        // nginx's documented sequence for 5/1/1: a a b a c a a
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn zero_weights_and_exclusions() {
        let mut s = Swrr::new(vec![0, 0]);
        assert_eq!(s.pick(&[]), None);
        let mut s = Swrr::new(vec![1, 1, 1]);
        for _ in 0..10 {
            let p = s.pick(&[0, 2]).expect("backend 1 is left");
            assert_eq!(p, 1);
        }
        assert_eq!(s.pick(&[0, 1, 2]), None);
    }
}
