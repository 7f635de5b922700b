//! A bounded raw-socket SYN sender, for the XDP guard's flood test and its benchmark.
//!
//! [`syn_flood`] sends hand-made IPv4 + TCP SYNs (checksums set) from any source
//! address through an `IPPROTO_RAW` socket in the calling thread's network namespace,
//! stopping at a count or a duration, whichever comes first. Use it only inside a
//! namespace of a [`crate::Bed`]: the destination must be an address of the bed.
use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

/// Source ports used in turn (from 20000), so that the SYNs are distinct
/// connections; their packets are built ahead, so the loop only sends.
const PORTS: u16 = 4096;

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

/// The IPv4 + TCP SYN from `src:sport` to `dst:dport`, checksums set.
pub fn syn_packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = fold(sum(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&u32::from(sport).wrapping_mul(2_654_435_761).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let c = fold(sum(&tcp, sum(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
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
    // SAFETY: plain socket(2); the descriptor is owned just below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    let ring: Vec<Vec<u8>> = (0..PORTS)
        .map(|i| syn_packet(src, 20000 + i, dst, dport))
        .collect();
    let started = Instant::now();
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut i = 0u64;
    while i < max {
        let pkt = &ring[(i % u64::from(PORTS)) as usize];
        // SAFETY: buffer and address are valid for the call.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                std::ptr::from_ref(&to).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if usize::try_from(r).is_ok_and(|r| r == pkt.len()) {
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
