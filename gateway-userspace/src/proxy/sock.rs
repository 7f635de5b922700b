//! Socket options and queries the data path needs and neither std nor socket2 offers.
use std::{io, os::fd::AsRawFd};

fn getsockopt_raw<const N: usize>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<([u8; N], usize)> {
    let mut buf = [0u8; N];
    let mut len = N as libc::socklen_t;
    // SAFETY: buf is N bytes and len says so; the kernel writes at most len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok((buf, len as usize))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The socket cookie (`SO_COOKIE`): the key of the socket in `GW_SOCKS`.
pub fn cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    let (buf, len) = getsockopt_raw::<8>(fd, libc::SOL_SOCKET, libc::SO_COOKIE)?;
    if len != 8 {
        return Err(io::Error::other("short SO_COOKIE"));
    }
    Ok(u64::from_ne_bytes(buf))
}

/// Offset of `tcpi_bytes_acked` in `struct tcp_info` (include/uapi/linux/tcp.h).
const TCPI_BYTES_ACKED: usize = 120;

/// Bytes this socket's TCP has taken from the sender so far, counted from an arbitrary
/// origin: bytes acknowledged by the peer plus bytes still in the send queue
/// (`SIOCOUTQ`). Compare two readings, never one with a byte count.
pub fn bytes_handed_to_tcp(fd: &impl AsRawFd) -> io::Result<u64> {
    let (info, len) = getsockopt_raw::<256>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    if len < TCPI_BYTES_ACKED + 8 {
        return Err(io::Error::other("tcp_info without tcpi_bytes_acked"));
    }
    let mut acked = [0u8; 8];
    acked.copy_from_slice(&info[TCPI_BYTES_ACKED..TCPI_BYTES_ACKED + 8]);
    let acked = u64::from_ne_bytes(acked);
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + u64::try_from(outq).unwrap_or(0))
}

/// Offset of `tcpi_data_segs_in` in `struct tcp_info` (include/uapi/linux/tcp.h,
/// Linux 4.6 and later); `tcpi_data_segs_out` follows it.
const TCPI_DATA_SEGS_IN: usize = 152;

/// Segments carrying payload this socket received and sent so far (`TCP_INFO`
/// `tcpi_data_segs_in`, `tcpi_data_segs_out`): pure ACKs, SYN and FIN without payload
/// are not counted; a GSO/GRO super-packet counts as the wire segments it stands for
/// (`tcp_segs_in()` and `__tcp_transmit_skb()` in net/ipv4); retransmissions and
/// duplicates count each time. 32-bit counters in the kernel.
pub fn data_segments(fd: &impl AsRawFd) -> io::Result<(u64, u64)> {
    let (info, len) = getsockopt_raw::<256>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    if len < TCPI_DATA_SEGS_IN + 8 {
        return Err(io::Error::other("tcp_info without tcpi_data_segs_in/out"));
    }
    let at = |o: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&info[o..o + 4]);
        u64::from(u32::from_ne_bytes(b))
    };
    Ok((at(TCPI_DATA_SEGS_IN), at(TCPI_DATA_SEGS_IN + 4)))
}

/// Sets an `int` socket option.
fn setsockopt_int(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes one int.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `SO_RCVLOWAT`. On a socket in a sockmap this also wakes the verdict program
/// for data already queued (`tcp_set_rcvlowat()` calls `tcp_data_ready()`).
pub fn set_rcvlowat(fd: &impl AsRawFd, bytes: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// `TCP_WINDOW_CLAMP`: the largest receive window this socket advertises.
pub fn window_clamp(fd: &impl AsRawFd) -> io::Result<i32> {
    let (buf, len) = getsockopt_raw::<4>(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP)?;
    if len != 4 {
        return Err(io::Error::other("short TCP_WINDOW_CLAMP"));
    }
    Ok(i32::from_ne_bytes(buf))
}

/// Sets `TCP_WINDOW_CLAMP`. The window never shrinks below what was advertised; a
/// smaller clamp only stops it from opening again (`tcp_set_window_clamp()` in
/// net/ipv4/tcp.c; the kernel raises tiny values to half of `SOCK_MIN_RCVBUF`).
pub fn set_window_clamp(fd: &impl AsRawFd, bytes: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, bytes)
}

/// Ends the connection when the peer acknowledges nothing for `timeout`: while data
/// is outstanding (`TCP_USER_TIMEOUT`: the retransmissions give up, the socket fails
/// with `ETIMEDOUT`), and while the connection is silent (keepalive probes start after
/// `timeout` of silence, one every third of it; with a user timeout set the kernel
/// gives up once `timeout` passed without an answer, `tcp_keepalive_timer()` in
/// `net/ipv4/tcp_timer.c`). Either way the socket fails with `ETIMEDOUT`, and the data
/// path resets the other side. A zero `timeout` leaves the kernel's defaults.
pub fn set_dead_peer_timeout(fd: &impl AsRawFd, timeout: std::time::Duration) -> io::Result<()> {
    if timeout.is_zero() {
        return Ok(());
    }
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let secs = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX).max(1);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs)?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        (secs / 3).max(1),
    )?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)
}

/// How a socket's buffers are sized ([`set_buffers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferSize {
    /// The size of the send and of the receive buffer, each, in bytes: the kernel's
    /// `sk_sndbuf` and `sk_rcvbuf` (what `ss -m` shows as `tb` and `rb`).
    pub bytes: u32,
    /// Let TCP's autotuning grow (or, under memory pressure, shrink) the buffers from
    /// there, as from the `tcp_wmem`/`tcp_rmem` defaults; false keeps them at `bytes`.
    pub autotune: bool,
}

/// Sets a socket's send and receive buffers to `size.bytes` each. `SO_SNDBUF` and
/// `SO_RCVBUF` store twice the value asked for and lock the size against TCP's
/// autotuning (`SOCK_SNDBUF_LOCK`, `SOCK_RCVBUF_LOCK`; `sk_setsockopt()` in
/// [net/core/sock.c](https://github.com/torvalds/linux/blob/master/net/core/sock.c)),
/// so half of `bytes` is asked for, with the `*FORCE` variants (`CAP_NET_ADMIN`:
/// above `net.core.wmem_max`/`rmem_max`), falling back to the capped ones without the
/// capability. With `autotune`, `SO_BUF_LOCK` 0 (Linux 5.14) clears both locks again:
/// the size becomes autotuning's starting point.
pub fn set_buffers(fd: &impl AsRawFd, size: BufferSize) -> io::Result<()> {
    let half = i32::try_from(size.bytes / 2).unwrap_or(i32::MAX);
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        match setsockopt_int(fd, libc::SOL_SOCKET, force, half) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                setsockopt_int(fd, libc::SOL_SOCKET, plain, half)?;
            }
            r => r?,
        }
    }
    if size.autotune {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_BUF_LOCK, 0)?;
    }
    Ok(())
}

/// Arms an abortive close: closing the socket now sends a RST, not a FIN.
pub fn arm_reset(fd: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(fd).set_linger(Some(std::time::Duration::ZERO));
}

/// `shutdown(SHUT_WR)`: sends a FIN after everything written so far.
pub fn shutdown_write(fd: &impl std::os::fd::AsFd) -> io::Result<()> {
    socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Write)
}

/// Number of bytes waiting to be read (`FIONREAD`).
pub fn readable_bytes(fd: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    if rc == 0 {
        Ok(usize::try_from(n).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SO_RCVBUF`: the receive buffer size as the kernel keeps it (`sk_rcvbuf`, twice
/// what was asked for).
pub fn rcvbuf(fd: &impl AsRawFd) -> io::Result<i32> {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF)
}

/// Sets `SO_RCVBUF` to `bytes` as the kernel keeps it (asks for half; the kernel
/// raises tiny values to `SOCK_MIN_RCVBUF`), with `SO_RCVBUFFORCE` so that a size
/// above `net.core.rmem_max` (set by [`set_buffers`]) comes back whole, falling back
/// to the capped `SO_RCVBUF` without `CAP_NET_ADMIN`. This locks the size against
/// autotuning: [`set_buf_lock`] restores the lock bits.
pub fn set_rcvbuf(fd: &impl AsRawFd, bytes: i32) -> io::Result<()> {
    let half = (bytes / 2).max(1);
    match setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, half) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, half)
        }
        r => r,
    }
}

/// `SO_BUF_LOCK` (Linux 5.14): which of the buffer sizes autotuning may not change
/// (`SOCK_SNDBUF_LOCK` 1, `SOCK_RCVBUF_LOCK` 2).
pub fn buf_lock(fd: &impl AsRawFd) -> io::Result<i32> {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_BUF_LOCK)
}

/// Sets `SO_BUF_LOCK` (see [`buf_lock`]).
pub fn set_buf_lock(fd: &impl AsRawFd, bits: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_BUF_LOCK, bits)
}

fn getsockopt_int(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let (buf, len) = getsockopt_raw::<4>(fd, level, name)?;
    if len != 4 {
        return Err(io::Error::other("short socket option"));
    }
    Ok(i32::from_ne_bytes(buf))
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, time::Duration};

    use super::*;

    fn int(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> i32 {
        let (buf, len) = getsockopt_raw::<4>(fd, level, name).expect("getsockopt");
        assert_eq!(len, 4);
        i32::from_ne_bytes(buf)
    }

    #[test]
    fn data_segments_count_payload_segments_each_way() {
        use std::io::{Read as _, Write as _};
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut a = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut b, _) = l.accept().expect("accept");
        a.set_nodelay(true).expect("nodelay");
        b.set_nodelay(true).expect("nodelay");
        assert_eq!(
            data_segments(&a).expect("tcp_info"),
            (0, 0),
            "handshake only"
        );
        let mut buf = [0u8; 5];
        for _ in 0..3 {
            a.write_all(b"hello").expect("write");
            b.read_exact(&mut buf).expect("read");
        }
        b.write_all(b"world").expect("write");
        a.read_exact(&mut buf).expect("read");
        assert_eq!(data_segments(&a).expect("tcp_info"), (1, 3));
        assert_eq!(data_segments(&b).expect("tcp_info"), (3, 1));
    }

    #[test]
    fn set_buffers_sizes_both_buffers_with_and_without_autotuning() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        // Unprivileged, the size is capped at net.core.{w,r}mem_max (doubled).
        let cap = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .expect("sysctl")
                .trim()
                .parse::<i32>()
                .expect("number")
                * 2
        };
        let bytes = 1 << 20;
        for autotune in [false, true] {
            set_buffers(&s, BufferSize { bytes, autotune }).expect("set");
            let snd = int(&s, libc::SOL_SOCKET, libc::SO_SNDBUF);
            let rcv = int(&s, libc::SOL_SOCKET, libc::SO_RCVBUF);
            let want = i32::try_from(bytes).expect("fits");
            assert!(
                snd == want || snd == cap("wmem_max"),
                "SO_SNDBUF {snd}, asked {want}"
            );
            assert!(
                rcv == want || rcv == cap("rmem_max"),
                "SO_RCVBUF {rcv}, asked {want}"
            );
            // SOCK_SNDBUF_LOCK | SOCK_RCVBUF_LOCK, or neither.
            let locks = int(&s, libc::SOL_SOCKET, libc::SO_BUF_LOCK);
            assert_eq!(locks, if autotune { 0 } else { 3 }, "autotune {autotune}");
        }
    }

    #[test]
    fn dead_peer_timeout_sets_user_timeout_and_keepalive() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        set_dead_peer_timeout(&s, Duration::ZERO).expect("zero");
        assert_eq!(int(&s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 0);
        assert_eq!(int(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
        set_dead_peer_timeout(&s, Duration::from_secs(30)).expect("set");
        assert_eq!(int(&s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 30_000);
        assert_eq!(int(&s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 30);
        assert_eq!(int(&s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 10);
        assert_eq!(int(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
    }
}
