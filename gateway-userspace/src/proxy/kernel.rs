//! The kernel path: both sockets in the `GW_SOCKS` sockhash, the verdict program
//! redirecting every segment to the peer's egress. The agent moves no payload; it
//! only watches the two sockets for the events the kernel leaves to it.
//!
//! Lifecycle of a pair (see `docs/datapath.md` for the kernel sources behind it):
//!
//! 1. Peers are written to `GW_PEERS`, then both sockets are inserted in `GW_SOCKS`.
//! 2. Data that arrived before the insertion still sits in the TCP receive queue, where
//!    the verdict has not seen it. Setting `SO_RCVLOWAT` calls the socket's
//!    `sk_data_ready`, which sockmap replaced: the queue is run through the verdict,
//!    in order, before anything newer.
//! 3. Each direction waits for readiness on its source socket. Readable means one of:
//!    EOF (the verdict drops the zero-length FIN segment), data the verdict parked on
//!    the socket itself (the peer's queue passed its limit, or the redirect failed),
//!    or an error (reset).
//! 4. Parked data is forwarded from userspace, but only once the peer's TCP has taken
//!    every byte redirected before it (`bytes_redirected` in `GW_PEERS` against
//!    `TCP_INFO` `tcpi_bytes_acked` + `SIOCOUTQ`), so it cannot overtake them. The
//!    verdict keeps parking until the peer took the parked bytes too, then redirects
//!    again by itself: this is what bounds kernel memory on this path (see
//!    `docs/datapath.md`, "Kernel memory"). Parked bytes are peeked, sent, and only
//!    then read off the source, so its window stays shut meanwhile.
//!    With `--kernel-brake`, the first parked bytes engage the [`Brake`] (window
//!    clamp and receive buffer at their minimum): TCP flow control stops the sender,
//!    so that under a slow receiver about one window is parked per throttle. Only an
//!    engaged brake is watched with a timer, to release it.
//! 5. On EOF the FIN is passed on only once the peer's TCP has taken every byte
//!    redirected or forwarded to it, by the same comparison: a `shutdown()` issued
//!    earlier overtakes the psock queue and truncates the stream.
//! 6. A reset on either side resets the other. Entries are removed when the pair ends.
use std::{
    io,
    os::fd::AsFd,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{io::Interest, net::TcpStream};

use super::{
    conn::{Conn, DirError, SegmentsAtEnd, SideError},
    pool::Pool,
    sock,
    stats::Counters,
};
use crate::ebpf::{Datapath, MapOpError};

/// How long the peer's TCP may take no byte at all while the agent waits for it to
/// take the redirected bytes (before a FIN, or before forwarding parked bytes).
const DRAIN_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Buffers of [`FORWARD_BUF`] bytes for parked data, kept for reuse: a direction
/// holds one only while it reads, so an idle pair holds none.
static BUFS: Pool<Vec<u8>> = Pool::new(64);

/// Bytes read from a socket at once when forwarding parked data.
const FORWARD_BUF: usize = 64 * 1024;

/// Default of the bytes the verdict may queue towards a socket that its TCP has not
/// taken yet before it throttles the sender ([`gateway_common::Peer::queue_limit`]).
pub const QUEUE_LIMIT: u32 = gateway_common::PEER_QUEUE_LIMIT;

/// Errors of setting a pair up on the kernel path; the caller falls back to splice.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("socket cookie: {0}")]
    Cookie(#[source] io::Error),
    #[error("TCP_INFO: {0}")]
    TcpInfo(#[source] io::Error),
    #[error(transparent)]
    Map(#[from] MapOpError),
}

impl PairError {
    /// The label counted in `sockgate_sockmap_pair_failures_total`: `map_full` when
    /// `GW_SOCKS` or `GW_PEERS` has no room (`E2BIG`), else `other`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Map(MapOpError {
                source: aya::maps::MapError::SyscallError(e),
                ..
            }) if e.io_error.raw_os_error() == Some(libc::E2BIG) => "map_full",
            _ => "other",
        }
    }
}

/// One socket of a pair.
struct Sock<'a> {
    stream: &'a TcpStream,
    cookie: u64,
    /// `bytes_handed_to_tcp` when the pair was made.
    handed_base: u64,
}

/// A pair on the kernel path; when dropped, adds the bytes the verdict redirected to
/// its connection's counts and removes its map entries.
pub struct Pair {
    dp: Arc<Datapath>,
    client_cookie: u64,
    backend_cookie: u64,
    conn: Arc<Conn>,
    /// The verdict's queue limit for this pair, in bytes.
    queue_limit: u32,
    /// Whether a throttle engages the [`Brake`] (`--kernel-brake`).
    brake: bool,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let c2b = self.dp.bytes_redirected(self.client_cookie).unwrap_or(0);
        let b2c = self.dp.bytes_redirected(self.backend_cookie).unwrap_or(0);
        self.conn.set_cookies(None);
        self.conn.moved(true, c2b);
        self.conn.moved(false, b2c);
        self.dp
            .remove_peers(self.client_cookie, self.backend_cookie);
    }
}

impl Pair {
    /// The socket cookies of the client and the backend socket.
    pub fn cookies(&self) -> (u64, u64) {
        (self.client_cookie, self.backend_cookie)
    }
}

/// Puts `client` and `backend` in the maps. On success the pair is live: the caller
/// must then [`run`] it. `queue_limit` bounds what the verdict queues towards either
/// socket before it throttles the sender (default [`QUEUE_LIMIT`]); with `brake`, a
/// throttle also stops the sender with TCP flow control ([`Brake`]).
pub fn insert(
    dp: &Arc<Datapath>,
    client: &TcpStream,
    backend: &TcpStream,
    listener_port: u16,
    (queue_limit, brake): (u32, bool),
    conn: &Arc<Conn>,
) -> Result<(Pair, [u64; 2]), PairError> {
    let c = sock::cookie(client).map_err(PairError::Cookie)?;
    let b = sock::cookie(backend).map_err(PairError::Cookie)?;
    let bases = [
        sock::bytes_handed_to_tcp(client).map_err(PairError::TcpInfo)?,
        sock::bytes_handed_to_tcp(backend).map_err(PairError::TcpInfo)?,
    ];
    dp.insert_pair((c, client), (b, backend), listener_port, queue_limit)?;
    let queue_limit = if queue_limit == 0 {
        QUEUE_LIMIT
    } else {
        queue_limit
    };
    // No window clamp at pairing: a clamp of a quarter of the queue limit (1 MiB)
    // on both sockets cut one stream from 2.1 to 0.3 Gbit/s (docs/performance.md,
    // "Memory bound without parking"); the brake clamps only after a throttle.
    // Run data queued before the insertion through the verdict.
    let _ = sock::set_rcvlowat(client, 1);
    let _ = sock::set_rcvlowat(backend, 1);
    conn.set_cookies(Some((c, b)));
    Ok((
        Pair {
            dp: dp.clone(),
            client_cookie: c,
            backend_cookie: b,
            conn: conn.clone(),
            queue_limit,
            brake,
        },
        bases,
    ))
}

/// Waits until `dst`'s TCP has taken every byte redirected from `src` plus the
/// `written` bytes the agent forwarded itself. Fails when `dst` takes nothing for
/// [`DRAIN_STALL_TIMEOUT`].
async fn wait_taken(
    dp: &Datapath,
    src: &Sock<'_>,
    dst: &Sock<'_>,
    written: u64,
    what: &str,
) -> Result<(), DirError> {
    let mut last = None;
    let mut progress_at = Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        let redirected = dp.bytes_redirected(src.cookie).unwrap_or(0);
        let handed = sock::bytes_handed_to_tcp(dst.stream)
            .map_err(DirError::Dst)?
            .saturating_sub(dst.handed_base);
        if handed >= redirected + written {
            return Ok(());
        }
        if last != Some(handed) {
            last = Some(handed);
            progress_at = Instant::now();
        } else if progress_at.elapsed() > DRAIN_STALL_TIMEOUT {
            return Err(DirError::Dst(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "peer took no byte for {DRAIN_STALL_TIMEOUT:?} before {what} ({handed} of {} bytes)",
                    redirected + written
                ),
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Bytes the verdict redirected or parked on `src` that `dst`'s TCP has not taken yet
/// (redirected ones in `dst`'s psock queue, parked ones not forwarded yet), counting
/// (parked bytes the agent forwarded count as handed). `None` when the pair left the
/// maps.
fn outstanding(dp: &Datapath, src: &Sock<'_>, dst: &Sock<'_>) -> Option<u64> {
    let owed = dp.bytes_redirected(src.cookie)? + dp.bytes_passed(src.cookie)?;
    let handed = sock::bytes_handed_to_tcp(dst.stream)
        .ok()?
        .saturating_sub(dst.handed_base);
    Some(owed.saturating_sub(handed))
}

/// Holds `src`'s receive window shut while the queue towards its peer is long, so
/// that TCP flow control stops the sender instead of the verdict parking its bytes.
///
/// Redirected segments are charged to no socket while they wait in the peer's psock
/// queue (`tcp_read_skb()` orphans them), so `src`'s window never closes by itself.
/// Engaged, the brake clamps the window to its minimum (the sender may only finish
/// the window it was offered) and shrinks `SO_RCVBUF` to its minimum: the few bytes
/// the verdict then parks on `src` are charged to it, and its window drops to zero.
/// Released, both come back as they were, autotuning included (`SO_BUF_LOCK`). (A
/// window clamp kept at a quarter of the queue limit after a release, or set at
/// pairing, cut one stream to a sixth: docs/performance.md.)
struct Brake<'a> {
    src: &'a TcpStream,
    /// `--kernel-brake`: off, [`Brake::engage`] does nothing.
    enabled: bool,
    /// Window clamp, receive buffer and buffer lock bits before the brake.
    saved: Option<(i32, i32, i32)>,
}

impl Brake<'_> {
    fn engaged(&self) -> bool {
        self.saved.is_some()
    }

    fn engage(&mut self) {
        if !self.enabled || self.saved.is_some() {
            return;
        }
        let (Ok(clamp), Ok(rcvbuf), Ok(lock)) = (
            sock::window_clamp(self.src),
            sock::rcvbuf(self.src),
            sock::buf_lock(self.src),
        ) else {
            return;
        };
        self.saved = Some((clamp, rcvbuf, lock));
        let _ = sock::set_window_clamp(self.src, 1);
        let _ = sock::set_rcvbuf(self.src, 1);
    }

    fn release(&mut self) {
        if let Some((clamp, rcvbuf, lock)) = self.saved.take() {
            let _ = sock::set_rcvbuf(self.src, rcvbuf);
            let _ = sock::set_buf_lock(self.src, lock);
            let now = sock::window_clamp(self.src).unwrap_or(0);
            let _ = sock::set_window_clamp(self.src, clamp.max(now));
        }
    }
}

/// Time between two looks at the queue of a direction whose brake is engaged: short,
/// so that the sender it holds resumes as soon as the queue drained (a backoff to
/// 64 ms while the held sender moved nothing kept one stream at 0.3 Gbit/s).
const WATCH_EVERY: Duration = Duration::from_millis(1);

/// A direction's periodic look at its queue while its [`Brake`] is engaged:
/// releases it once nothing parked is left and the queue is shorter than `low`.
struct Watch {
    /// Queue length under which the brake is released.
    low: u64,
}

impl Watch {
    fn look(
        &self,
        dp: &Datapath,
        (src, dst): (&Sock<'_>, &Sock<'_>),
        written: u64,
        brake: &mut Brake<'_>,
    ) {
        if outstanding(dp, src, dst).is_some_and(|o| o < self.low)
            && dp.bytes_passed(src.cookie).unwrap_or(0) <= written
        {
            brake.release();
        }
    }
}

/// One direction: waits for EOF on `src`, forwards any data the verdict parked on
/// `src` (in order, after everything redirected before it), and passes the FIN on
/// once `dst` has taken everything. Parked bytes engage the [`Brake`] on `src` (the
/// sender may still finish the window it was offered); while it is engaged, the
/// direction watches the queue towards `dst` and releases it once the queue drained
/// below a sixteenth of `queue_limit`.
async fn direction(
    dp: &Datapath,
    (src, dst): (&Sock<'_>, &Sock<'_>),
    (queue_limit, brake_on): (u32, bool),
    (counters, conn): (&Counters, &Conn),
    client_to_backend: bool,
) -> Result<(), DirError> {
    // Bytes this agent wrote to dst itself (data the verdict parked on src).
    let mut written: u64 = 0;
    let mut brake = Brake {
        src: src.stream,
        enabled: brake_on,
        saved: None,
    };
    let watch = Watch {
        low: u64::from(queue_limit / 16),
    };
    // Held while reading; given back when src has nothing more to read.
    let mut held: Option<Vec<u8>> = None;
    let mut eof_since: Option<Instant> = None;
    loop {
        tokio::select! {
            r = src.stream.readable() => r.map_err(DirError::Src)?,
            // Only an engaged brake is watched (to release it): a timer per direction
            // of every connection cost more than the path saves (the many-connection
            // bench rows), so the brake engages on the verdict's first parked bytes.
            () = tokio::time::sleep(WATCH_EVERY), if brake.engaged() => {
                watch.look(dp, (src, dst), written, &mut brake);
                continue;
            }
        }
        if dp.bytes_passed(src.cookie).unwrap_or(0) > written {
            // Parked bytes: stop the sender (the parked bytes close src's window), let
            // dst's TCP take everything redirected before them, then forward them.
            brake.engage();
            wait_taken(dp, src, dst, written, "forwarding parked bytes").await?;
            let buf = match held {
                Some(ref mut b) => b,
                None => held.insert(
                    BUFS.take(|| Ok::<_, io::Error>(vec![0u8; FORWARD_BUF]))
                        .map_err(DirError::Local)?,
                ),
            };
            let n = forward_parked(src.stream, dst.stream, buf).await?;
            written += n;
            counters.moved(client_to_backend, n);
            conn.moved(client_to_backend, n);
            if n > 0 {
                continue;
            }
        }
        let buf = match held {
            Some(ref mut b) => b,
            None => held.insert(
                BUFS.take(|| Ok::<_, io::Error>(vec![0u8; FORWARD_BUF]))
                    .map_err(DirError::Local)?,
            ),
        };
        match src.stream.try_read(buf) {
            Ok(0) => {
                if let Some(b) = held.take() {
                    BUFS.give(b);
                }
                // A parked segment can still be on its way to src's receive queue (it
                // waits behind data redirected to src in src's psock queue): EOF
                // counts only once every parked byte was forwarded.
                if dp.bytes_passed(src.cookie).unwrap_or(0) <= written {
                    break;
                }
                let since = *eof_since.get_or_insert_with(Instant::now);
                if since.elapsed() > DRAIN_STALL_TIMEOUT {
                    return Err(DirError::Src(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "parked bytes never reached the socket after EOF",
                    )));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(n) => {
                brake.engage();
                wait_taken(dp, src, dst, written, "forwarding parked bytes").await?;
                write_all(dst.stream, &buf[..n])
                    .await
                    .map_err(DirError::Dst)?;
                written += n as u64;
                counters.moved(client_to_backend, n as u64);
                conn.moved(client_to_backend, n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(b) = held.take() {
                    BUFS.give(b);
                }
                // Every parked byte is in dst's TCP: the verdict's next segment
                // redirects again. Let the window open as before.
                if dp.bytes_passed(src.cookie).unwrap_or(0) <= written
                    && outstanding(dp, src, dst).is_none_or(|o| o < watch.low)
                {
                    brake.release();
                }
            }
            Err(e) => return Err(DirError::Src(e)),
        }
    }
    brake.release();
    // EOF: wait until dst's TCP holds every byte before the FIN.
    wait_taken(dp, src, dst, written, "FIN").await?;
    sock::shutdown_write(dst.stream).map_err(DirError::Dst)
}

/// Forwards the bytes parked on `src` to `dst` without opening `src`'s window before
/// they are in `dst`'s TCP: each chunk is peeked, written, and only then taken off
/// `src` (a read that frees receive buffer space lets the sender send again, and a
/// segment arriving before the chunk reached `dst` would be parked behind it, so that
/// the verdict would never see the queue empty). Returns the bytes forwarded.
async fn forward_parked(src: &TcpStream, dst: &TcpStream, buf: &mut [u8]) -> Result<u64, DirError> {
    let mut total = 0u64;
    loop {
        let n = match recv(src, buf, libc::MSG_PEEK) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
            Err(e) => return Err(DirError::Src(e)),
        };
        write_all(dst, &buf[..n]).await.map_err(DirError::Dst)?;
        // The same bytes: nothing else reads src, and parked data is queued in order.
        let mut left = n;
        while left > 0 {
            match recv(src, &mut buf[..left], 0) {
                Ok(0) => {
                    return Err(DirError::Src(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peeked bytes gone from the socket",
                    )));
                }
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.readable().await.map_err(DirError::Src)?;
                }
                Err(e) => return Err(DirError::Src(e)),
            }
        }
        total += n as u64;
    }
}

/// A non-blocking `recv(2)` with `flags` on `s`, clearing its readiness on
/// `WouldBlock`.
fn recv(s: &TcpStream, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    s.try_io(Interest::READABLE, || {
        // SAFETY: plain recv on a valid fd into a buffer of buf.len() bytes.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(s),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags | libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    })
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || {
            // SAFETY: plain send on a valid fd and buffer.
            let n = unsafe {
                libc::send(
                    std::os::fd::AsRawFd::as_raw_fd(dst),
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        }) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs an inserted pair until both directions ended, or resets both on an error.
pub async fn run(
    pair: Pair,
    bases: [u64; 2],
    client: TcpStream,
    backend: TcpStream,
    counters: Arc<Counters>,
) -> Result<(), SideError> {
    let conn = pair.conn.clone();
    let _segments = SegmentsAtEnd {
        client: &client,
        backend: &backend,
        conn: &conn,
    };
    let c = Sock {
        stream: &client,
        cookie: pair.client_cookie,
        handed_base: bases[0],
    };
    let b = Sock {
        stream: &backend,
        cookie: pair.backend_cookie,
        handed_base: bases[1],
    };
    let result = {
        let c2b = direction(
            &pair.dp,
            (&c, &b),
            (pair.queue_limit, pair.brake),
            (&counters, &conn),
            true,
        );
        let b2c = direction(
            &pair.dp,
            (&b, &c),
            (pair.queue_limit, pair.brake),
            (&counters, &conn),
            false,
        );
        tokio::pin!(c2b, b2c);
        let mut c2b_done = false;
        let mut b2c_done = false;
        let mut err = None;
        while !(c2b_done && b2c_done) && err.is_none() {
            tokio::select! {
                r = &mut c2b, if !c2b_done => match r { Ok(()) => c2b_done = true, Err(e) => err = Some(e.sided(true)) },
                r = &mut b2c, if !b2c_done => match r { Ok(()) => b2c_done = true, Err(e) => err = Some(e.sided(false)) },
            }
        }
        err.map_or(Ok(()), Err)
    };
    drop(pair);
    if result.is_err() {
        sock::arm_reset(&client.as_fd());
        sock::arm_reset(&backend.as_fd());
    }
    result
}
