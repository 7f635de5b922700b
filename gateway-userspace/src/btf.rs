//! Reads the offset of a struct member from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The verdict program reads the peer socket's `tcp_sock.write_seq` through a BTF
//! pointer (`bpf_skc_to_tcp_sock()`); the offset of that field depends on the kernel
//! build, so the loader looks it up here and hands it to the program as a read-only
//! global. Only what that needs is parsed: the header, the string section, and the
//! type records, walked by kind (the format is in the kernel's
//! [Documentation/bpf/btf.rst](https://github.com/torvalds/linux/blob/master/Documentation/bpf/btf.rst)).
use std::path::{Path, PathBuf};

/// Errors of looking a member up.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a BTF blob ({what})")]
    Format { path: PathBuf, what: &'static str },
    #[error("{path}: struct {name} has no member {member}")]
    NotFound {
        path: PathBuf,
        name: String,
        member: String,
    },
}

const BTF_MAGIC: u16 = 0xEB9F;
const KIND_STRUCT: u32 = 4;

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn str_at(strings: &[u8], at: u32) -> Option<&[u8]> {
    let rest = strings.get(usize::try_from(at).ok()?..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    Some(&rest[..end])
}

/// Bytes of kind-specific data after a type record's 12-byte header.
fn extra_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        // INT, VAR, DECL_TAG: one u32
        1 | 14 | 17 => 4,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        2 | 7..=12 | 16 | 18 => 0,
        // ARRAY
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64: 12 bytes per entry
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM, FUNC_PROTO: 8 bytes per entry
        6 | 13 => 8 * vlen,
        _ => return None,
    })
}

/// Byte offset of `member` in `struct name`, from the little-endian BTF blob `data`.
/// `None` when the blob is malformed; `Some(None)` when the member is not there.
fn find(data: &[u8], name: &str, member: &str) -> Result<Option<u32>, &'static str> {
    let magic = data.get(0..2).ok_or("short header")?;
    if u16::from_le_bytes([magic[0], magic[1]]) != BTF_MAGIC {
        return Err("bad magic (or big-endian)");
    }
    let hdr_len = u32_at(data, 4).ok_or("short header")? as usize;
    let type_off = u32_at(data, 8).ok_or("short header")? as usize;
    let type_len = u32_at(data, 12).ok_or("short header")? as usize;
    let str_off = u32_at(data, 16).ok_or("short header")? as usize;
    let str_len = u32_at(data, 20).ok_or("short header")? as usize;
    let types = data
        .get(hdr_len + type_off..hdr_len + type_off + type_len)
        .ok_or("type section out of bounds")?;
    let strings = data
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .ok_or("string section out of bounds")?;
    let mut at = 0;
    while at < types.len() {
        let name_off = u32_at(types, at).ok_or("truncated type")?;
        let info = u32_at(types, at + 4).ok_or("truncated type")?;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        let vlen = (info & 0xffff) as usize;
        let body = at + 12;
        let extra = extra_len(kind, vlen).ok_or("unknown type kind")?;
        if kind == KIND_STRUCT && str_at(strings, name_off) == Some(name.as_bytes()) {
            for i in 0..vlen {
                let m = body + 12 * i;
                let m_name = u32_at(types, m).ok_or("truncated member")?;
                let m_off = u32_at(types, m + 8).ok_or("truncated member")?;
                if str_at(strings, m_name) == Some(member.as_bytes()) {
                    // With kind_flag the top 8 bits are a bitfield size.
                    let bits = if kind_flag {
                        m_off & 0x00ff_ffff
                    } else {
                        m_off
                    };
                    if bits % 8 != 0 {
                        return Ok(None);
                    }
                    return Ok(Some(bits / 8));
                }
            }
        }
        at = body + extra;
    }
    Ok(None)
}

/// Byte offset of `member` in `struct name` of the kernel BTF at `path`.
pub fn member_offset(path: &Path, name: &str, member: &str) -> Result<u32, BtfError> {
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.to_owned(),
        source,
    })?;
    match find(&data, name, member) {
        Ok(Some(off)) => Ok(off),
        Ok(None) => Err(BtfError::NotFound {
            path: path.to_owned(),
            name: name.to_owned(),
            member: member.to_owned(),
        }),
        Err(what) => Err(BtfError::Format {
            path: path.to_owned(),
            what,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: `struct s { u32 a; u32 b; }` with `int` as type 1.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0";
        let mut types = Vec::new();
        let mut push = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // [1] INT "int" size 4, encoding word
        push(1);
        push(1 << 24);
        push(4);
        push(32);
        // [2] STRUCT "s" size 8, two members
        push(5);
        push((4 << 24) | 2);
        push(8);
        push(7); // "a"
        push(1);
        push(0);
        push(9); // "b"
        push(1);
        push(32);
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.push(1); // version
        out.push(0); // flags
        for v in [
            24u32,
            0,
            u32::try_from(types.len()).expect("len"),
            u32::try_from(types.len()).expect("len"),
            u32::try_from(strings.len()).expect("len"),
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_members_by_name() {
        let b = blob();
        assert_eq!(find(&b, "s", "a"), Ok(Some(0)));
        assert_eq!(find(&b, "s", "b"), Ok(Some(4)));
        assert_eq!(find(&b, "s", "c"), Ok(None));
        assert_eq!(find(&b, "t", "a"), Ok(None));
    }

    #[test]
    fn rejects_garbage() {
        assert!(find(b"nope", "s", "a").is_err());
        let mut b = blob();
        b.truncate(30);
        assert!(find(&b, "s", "a").is_err());
    }

    #[test]
    fn running_kernel_has_tcp_sock_write_seq() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            return;
        }
        let off = member_offset(path, "tcp_sock", "write_seq").expect("write_seq");
        assert!(off > 0 && off.is_multiple_of(4), "offset {off}");
    }
}
