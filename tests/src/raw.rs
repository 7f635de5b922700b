//! Raw IPv4/TCP packets, for segments a normal socket never sends: a bounded SYN
//! flood for the XDP guard's test and benchmark, and forged segments for the data
//! path's tests.
//!
//! [`syn_flood`] sends hand-made IPv4 + TCP SYNs (checksums set) from any source
//! address through an `IPPROTO_RAW` socket in the calling thread's network namespace,
//! stopping at a count or a duration, whichever comes first. Use it only inside a
//! namespace of a [`crate::Bed`]: the destination must be an address of the bed.
use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

/// Source ports used in turn (from 20000), so that the SYNs are distinct
/// connections; their packets are built ahead, so the loop only sends.
pub const PORTS: u16 = 4096;

/// What [`syn_flood`] did.
#[derive(Clone, Copy, Debug)]
pub struct Flood {
    /// SYNs the socket accepted.
    pub sent: u64,
    /// Sends that failed (e.g. `ENOBUFS` when a queue is full).
    pub failed: u64,
    /// From the first send to the return.
    pub elapsed: Duration,
}

fn sum(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The internet checksum of `data` (RFC 1071), ready to store.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum(data, 0))
}

/// An IPv4 packet (no options, DF set) from `src` to `dst` carrying `payload` of
/// protocol `proto`, with its header checksum set.
///
/// # Panics
/// When the packet would not fit in 64 KiB.
pub fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("packet fits in 64 KiB");
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(payload);
    ip
}

/// TCP flags.
pub const SYN: u8 = 0x02;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// An IPv4 packet holding a TCP segment without options from `src` to `dst`, with
/// both checksums set.
///
/// # Panics
/// When the packet would not fit in 64 KiB.
pub fn tcp_packet(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let tcp_len = u16::try_from(20 + payload.len()).expect("segment fits in 64 KiB");
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&tcp_len.to_be_bytes());
    let c = fold(sum(&tcp, sum(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ip_packet(*src.ip(), *dst.ip(), 6, &tcp)
}

/// The IPv4 + TCP SYN from `src:sport` to `dst:dport`, checksums set.
pub fn syn_packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let isn = u32::from(sport).wrapping_mul(2_654_435_761);
    tcp_packet(
        SocketAddrV4::new(src, sport),
        SocketAddrV4::new(dst, dport),
        isn,
        0,
        SYN,
        &[],
    )
}

/// A raw socket that sends whole IPv4 packets (`IPPROTO_RAW`) from the namespace of
/// the thread that made it.
pub struct Sender(OwnedFd);

impl Sender {
    /// A new raw socket.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned just below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `pkt` (an IPv4 packet) towards `dst`; true when all of it went.
    pub fn send(&self, dst: Ipv4Addr, pkt: &[u8]) -> bool {
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: buffer and address are valid for the call.
        let r = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                std::ptr::from_ref(&to).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        usize::try_from(r).is_ok_and(|r| r == pkt.len())
    }
}

/// Sends up to `max` SYNs from `src` to `dst:dport`, for at most `max_time`, through
/// a raw socket in the calling thread's namespace. Source ports run from 20000 and
/// wrap after 4096 SYNs.
pub fn syn_flood(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    max: u64,
    max_time: Duration,
) -> io::Result<Flood> {
    let sender = Sender::new()?;
    let ring: Vec<Vec<u8>> = (0..PORTS)
        .map(|i| syn_packet(src, 20000 + i, dst, dport))
        .collect();
    let started = Instant::now();
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut i = 0u64;
    while i < max {
        let pkt = &ring[(i % u64::from(PORTS)) as usize];
        if sender.send(dst, pkt) {
            sent += 1;
        } else {
            failed += 1;
        }
        i += 1;
        // The clock is read every 64 sends: cheap, and still a bound on time.
        if i.is_multiple_of(64) && started.elapsed() > max_time {
            break;
        }
    }
    Ok(Flood {
        sent,
        failed,
        elapsed: started.elapsed(),
    })
}

/// The next sequence number `s` will send and the next it expects, read in TCP
/// repair mode (`TCP_REPAIR`, `TCP_QUEUE_SEQ`; needs `CAP_NET_ADMIN`), which is left
/// again at once.
pub fn tcp_seqs(s: &std::net::TcpStream) -> io::Result<(u32, u32)> {
    const TCP_REPAIR: libc::c_int = 19;
    const TCP_REPAIR_QUEUE: libc::c_int = 20;
    const TCP_QUEUE_SEQ: libc::c_int = 21;
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    let fd = std::os::fd::AsRawFd::as_raw_fd(s);
    let set = |opt: libc::c_int, v: libc::c_int| {
        // SAFETY: an int option, valid for the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                std::ptr::from_ref(&v).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let get_seq = || {
        let mut v: u32 = 0;
        let mut len = size_of::<u32>() as libc::socklen_t;
        // SAFETY: a u32 option, valid for the call.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                TCP_QUEUE_SEQ,
                std::ptr::from_mut(&mut v).cast(),
                &raw mut len,
            )
        };
        if rc == 0 {
            Ok(v)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(TCP_REPAIR, 1)?;
    let seqs = (|| {
        set(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
        let snd = get_seq()?;
        set(TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
        let rcv = get_seq()?;
        Ok((snd, rcv))
    })();
    set(TCP_REPAIR, 0)?;
    seqs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksums_verify() {
        let p = syn_packet(
            Ipv4Addr::new(10, 200, 0, 4),
            20001,
            Ipv4Addr::new(10, 200, 0, 1),
            8088,
        );
        assert_eq!(p.len(), 40);
        // A header with its checksum sums to 0xffff (folds to zero).
        assert_eq!(fold(sum(&p[..20], 0)), 0, "IPv4 header checksum");
        let pseudo = [&p[12..20], &[0, 6, 0, 20][..]].concat();
        assert_eq!(fold(sum(&p[20..], sum(&pseudo, 0))), 0, "TCP checksum");
        assert_eq!(p[33], 0x02, "SYN only");
    }
}
