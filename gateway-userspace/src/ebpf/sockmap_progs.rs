//! Programs attached to a sockhash with `BPF_PROG_ATTACH` (the map holds them, not a
//! link): which are attached, and detaching them. aya 0.14 detaches only the programs
//! it attached itself; a program an earlier agent attached to a pinned map that is
//! reused stays attached when that agent was killed, so the loader asks the kernel
//! (`BPF_PROG_QUERY` on the map, Linux 6.2: `sock_map_bpf_prog_query()` in
//! [net/core/sock_map.c](https://github.com/torvalds/linux/blob/master/net/core/sock_map.c)).
use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

/// `bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_PROG_QUERY: libc::c_long = 16;

/// `BPF_SK_MSG_VERDICT` of `enum bpf_attach_type`: an `sk_msg` program on a sockmap.
pub const SK_MSG_VERDICT: u32 = 7;

/// Most programs one query reports (a sockhash holds one per attach type).
const MAX_IDS: usize = 8;

/// `bpf(2)` with an attribute buffer of 32-bit words (`union bpf_attr` is 8-byte
/// aligned; the kernel takes the size given and wants the rest zero).
fn bpf(cmd: libc::c_long, attr: &mut [u32; 32]) -> io::Result<i64> {
    // SAFETY: attr is a valid, writable buffer of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Ids of the programs attached to the sockmap or sockhash `map` as `attach_type`.
pub fn attached(map: &impl AsFd, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; MAX_IDS];
    let mut attr = Attr::default();
    attr.0[0] = fd_u32(map)?; // query.target_fd
    attr.0[1] = attach_type; // query.attach_type
    let ptr = ids.as_mut_ptr() as u64;
    attr.set_u64(4, ptr); // query.prog_ids (offset 16)
    attr.0[6] = MAX_IDS as u32; // query.prog_cnt (offset 24)
    bpf(BPF_PROG_QUERY, &mut attr.0)?;
    let n = (attr.0[6] as usize).min(MAX_IDS);
    Ok(ids[..n].to_vec())
}

/// Detaches every program attached to `map` as `attach_type`; returns their ids.
pub fn detach_all(map: &impl AsFd, attach_type: u32) -> io::Result<Vec<u32>> {
    let ids = attached(map, attach_type)?;
    for &id in &ids {
        let mut attr = Attr::default();
        attr.0[0] = id; // prog_id
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr.0)?;
        // SAFETY: the kernel returned a new descriptor, owned here from now on.
        let prog = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) };
        let mut attr = Attr::default();
        attr.0[0] = fd_u32(map)?; // target_fd
        attr.0[1] = fd_u32(&prog)?; // attach_bpf_fd
        attr.0[2] = attach_type; // attach_type
        bpf(BPF_PROG_DETACH, &mut attr.0)?;
    }
    Ok(ids)
}

fn fd_u32(fd: &impl AsFd) -> io::Result<u32> {
    u32::try_from(fd.as_fd().as_raw_fd()).map_err(io::Error::other)
}

/// A zeroed `union bpf_attr`, as 32-bit words.
#[derive(Default)]
struct Attr([u32; 32]);

impl Attr {
    /// Writes a `__u64` at word `i` (8-byte aligned fields only).
    fn set_u64(&mut self, i: usize, v: u64) {
        #[expect(clippy::cast_possible_truncation, reason = "the low and high halves")]
        let (lo, hi) = (v as u32, (v >> 32) as u32);
        self.0[i] = lo;
        self.0[i + 1] = hi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sockhash and an `sk_msg` program that passes everything (`r0 = SK_PASS;
    /// exit`), made with raw `bpf(2)`.
    fn sockhash_and_msg_prog() -> (OwnedFd, OwnedFd) {
        let mut attr = Attr::default();
        attr.0[0] = 18; // BPF_MAP_TYPE_SOCKHASH
        attr.0[1] = 8; // key_size
        attr.0[2] = 8; // value_size
        attr.0[3] = 4; // max_entries
        let map = bpf(0, &mut attr.0).expect("BPF_MAP_CREATE (needs root)");
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        let mut attr = Attr::default();
        attr.0[0] = 16; // BPF_PROG_TYPE_SK_MSG
        attr.0[1] = 2; // insn_cnt
        attr.set_u64(2, insns.as_ptr() as u64);
        attr.set_u64(4, license.as_ptr() as u64);
        let prog = bpf(5, &mut attr.0).expect("BPF_PROG_LOAD");
        // SAFETY: new descriptors from the kernel.
        unsafe {
            (
                OwnedFd::from_raw_fd(i32::try_from(map).expect("fd")),
                OwnedFd::from_raw_fd(i32::try_from(prog).expect("fd")),
            )
        }
    }

    #[test]
    fn detach_all_removes_an_attached_msg_program() {
        let (map, prog) = sockhash_and_msg_prog();
        assert_eq!(
            attached(&map, SK_MSG_VERDICT).expect("query"),
            Vec::<u32>::new()
        );
        let mut attr = Attr::default();
        attr.0[0] = fd_u32(&map).expect("fd");
        attr.0[1] = fd_u32(&prog).expect("fd");
        attr.0[2] = SK_MSG_VERDICT;
        bpf(8, &mut attr.0).expect("BPF_PROG_ATTACH");
        let ids = attached(&map, SK_MSG_VERDICT).expect("query");
        assert_eq!(ids.len(), 1, "{ids:?}");
        assert_eq!(detach_all(&map, SK_MSG_VERDICT).expect("detach"), ids);
        assert!(attached(&map, SK_MSG_VERDICT).expect("query").is_empty());
        assert!(
            detach_all(&map, SK_MSG_VERDICT)
                .expect("nothing to detach")
                .is_empty()
        );
    }
}
