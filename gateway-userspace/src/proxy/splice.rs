//! The userspace path: `splice(2)` through a pipe, in both directions, with tokio
//! readiness.
//!
//! Each direction ("client->backend", "backend->client") moves bytes socket -> pipe ->
//! socket without copying them to userspace, and has its own EOF / shutdown state: a
//! FIN from one side is passed on (`shutdown(SHUT_WR)`) once the pipe of that direction
//! is empty, while the other direction keeps flowing. Backpressure is natural: a
//! direction reads only when its pipe has been emptied into the destination. A reset or
//! error on either socket resets the other.
//!
//! A direction holds a pipe only while bytes are in flight: taken from [`PIPES`] when
//! its source is readable, given back (empty) when the source has nothing more, so an
//! idle connection holds its two sockets and no pipe.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::Arc,
};

use tokio::{io::Interest, net::TcpStream};

use super::{
    conn::{Conn, DirError, SegmentsAtEnd, SideError},
    pool::Pool,
    sock,
    stats::Counters,
};

/// Bytes moved per `splice` call.
const CHUNK: usize = 256 * 1024;
/// Pipe capacity asked for (the kernel caps it at `fs.pipe-max-size`).
const PIPE_SIZE: libc::c_int = 1024 * 1024;

/// Idle pipes kept for reuse (two descriptors each).
pub static PIPES: Pool<Pipe> = Pool::new(64);

/// How a direction ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// EOF seen and passed on as a FIN.
    Eof,
}

/// A pipe of [`PIPE_SIZE`] bytes, both ends non-blocking.
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(io::Error::from)?;
        // SAFETY: F_SETPIPE_SZ takes an int; failure only leaves the default size.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Self { r, w })
    }
}

fn splice(from: &impl AsRawFd, to: &impl AsRawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain fds, null offsets (sockets and pipes have none).
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Moves `src` -> `dst` until EOF on `src`, then shuts `dst`'s write side down.
/// Bytes moved count in `counters` (the listener's) and in `conn` (the connection's).
pub async fn direction(
    src: &TcpStream,
    dst: &TcpStream,
    (counters, conn): (&Counters, &Conn),
    client_to_backend: bool,
) -> Result<End, DirError> {
    // Held while bytes are in flight; given back empty when src has nothing more.
    let mut held: Option<Pipe> = None;
    loop {
        // socket -> pipe
        src.readable().await.map_err(DirError::Src)?;
        let pipe = match held {
            Some(ref p) => p,
            None => held.insert(PIPES.take(Pipe::new).map_err(DirError::Local)?),
        };
        let n = match src.try_io(Interest::READABLE, || splice(src, &pipe.w, CHUNK)) {
            Ok(0) => {
                if let Some(p) = held.take() {
                    PIPES.give(p);
                }
                sock::shutdown_write(dst).map_err(DirError::Dst)?;
                return Ok(End::Eof);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(p) = held.take() {
                    PIPES.give(p);
                }
                continue;
            }
            // The pipe is empty here, but the connection ends: let it go.
            Err(e) => return Err(DirError::Src(e)),
        };
        // pipe -> socket, all of it before reading more
        let mut left = n;
        while left > 0 {
            dst.writable().await.map_err(DirError::Dst)?;
            match dst.try_io(Interest::WRITABLE, || splice(&pipe.r, dst, left)) {
                Ok(m) => {
                    left -= m;
                    counters.moved(client_to_backend, m as u64);
                    conn.moved(client_to_backend, m as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(DirError::Dst(e)),
            }
        }
    }
}

/// Proxies `client` <-> `backend` on the userspace path until both directions ended.
/// On an error in either direction both sockets are reset; the error says which side
/// it came from.
pub async fn run(
    client: TcpStream,
    backend: TcpStream,
    counters: Arc<Counters>,
    conn: &Conn,
) -> Result<(), SideError> {
    let _segments = SegmentsAtEnd {
        client: &client,
        backend: &backend,
        conn,
    };
    let result = {
        let c2b = direction(&client, &backend, (&counters, conn), true);
        let b2c = direction(&backend, &client, (&counters, conn), false);
        tokio::pin!(c2b, b2c);
        // Both directions must finish; the first error ends both.
        let mut c2b_done = false;
        let mut b2c_done = false;
        let mut err = None;
        while !(c2b_done && b2c_done) && err.is_none() {
            tokio::select! {
                r = &mut c2b, if !c2b_done => match r { Ok(_) => c2b_done = true, Err(e) => err = Some(e.sided(true)) },
                r = &mut b2c, if !b2c_done => match r { Ok(_) => b2c_done = true, Err(e) => err = Some(e.sided(false)) },
            }
        }
        err.map_or(Ok(()), Err)
    };
    if result.is_err() {
        sock::arm_reset(&client.as_fd());
        sock::arm_reset(&backend.as_fd());
    }
    result
}
