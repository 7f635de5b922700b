//! Resource figures the soak samples: the agent's resident memory and open descriptors
//! (`/proc/PID`), the node namespace's TCP sockets and the kernel's socket memory
//! (`/proc/PID/net/sockstat`, seen from the agent's namespace; memory and orphans are
//! machine-wide), the slab (`/proc/meminfo`, machine-wide), and the entries of every
//! map pinned in the agent's pin directory (`bpftool`).
use std::{collections::BTreeMap, path::Path, process::Command};

/// One agent's figures at one moment.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Resident memory of the agent, KiB.
    pub rss_kib: u64,
    /// Open descriptors of the agent.
    pub fds: u64,
    /// TCP sockets in use in the node namespace.
    pub tcp_inuse: u64,
    /// Orphaned TCP sockets (machine-wide).
    pub tcp_orphan: u64,
    /// TCP sockets in TIME-WAIT in the node namespace.
    pub tcp_tw: u64,
    /// Pages of TCP socket memory (machine-wide).
    pub tcp_mem_pages: u64,
    /// Slab, KiB (machine-wide).
    pub slab_kib: u64,
    /// Entries of each pinned map: hash maps counted, arrays at their size.
    pub maps: BTreeMap<String, u64>,
    /// The pinned maps that are hash maps (their entries come and go).
    pub hash_maps: Vec<String>,
}

/// Whether pinned map `name` holds counters (`GW_STATS`, `GW_FWD_STATS`, ...): an
/// entry per listener and path taken, kept while the listener exists, so it may gain
/// an entry the first time a path is taken; not a connection's state.
pub fn is_counter(name: &str) -> bool {
    name.ends_with("_STATS")
}

impl Sample {
    /// The hash maps that hold state (not counters).
    pub fn state_maps(&self) -> impl Iterator<Item = &String> {
        self.hash_maps.iter().filter(|m| !is_counter(m))
    }

    /// Entries of the hash maps that hold state, together.
    pub fn hash_entries(&self) -> u64 {
        self.state_maps().filter_map(|m| self.maps.get(m)).sum()
    }
}

fn field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A field of the `TCP:` line of sockstat (`inuse`, `orphan`, `tw`, `mem`, ...).
fn sockstat(text: &str, key: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words
                .windows(2)
                .find(|w| w[0] == key)
                .and_then(|w| w[1].parse().ok())
        })
        .unwrap_or(0)
}

/// Samples agent `pid` with its pins in `pin_dir`.
pub fn take(pid: u32, pin_dir: &Path) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let sock = std::fs::read_to_string(format!("/proc/{pid}/net/sockstat")).unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count) as u64;
    let (maps, hash_maps) = map_entries(pin_dir);
    Sample {
        rss_kib: field(&status, "VmRSS:").unwrap_or(0),
        fds,
        tcp_inuse: sockstat(&sock, "inuse"),
        tcp_orphan: sockstat(&sock, "orphan"),
        tcp_tw: sockstat(&sock, "tw"),
        tcp_mem_pages: sockstat(&sock, "mem"),
        slab_kib: field(&meminfo, "Slab:").unwrap_or(0),
        maps,
        hash_maps,
    }
}

fn bpftool(args: &[&str], path: &Path) -> Option<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Entries of every map pinned directly in `dir` (links and programs are skipped),
/// and the names of those that are hash maps.
pub fn map_entries(dir: &Path) -> (BTreeMap<String, u64>, Vec<String>) {
    let mut maps = BTreeMap::new();
    let mut hashes = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (maps, hashes);
    };
    for e in entries.flatten() {
        let path = e.path();
        if !path.is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(show) = bpftool(&["map", "show", "pinned"], &path) else {
            continue;
        };
        let kind = show["type"].as_str().unwrap_or_default().to_owned();
        let max = show["max_entries"].as_u64().unwrap_or(0);
        if kind.contains("hash") {
            let n = bpftool(&["map", "dump", "pinned"], &path)
                .and_then(|v| v.as_array().map(|a| a.len() as u64))
                .unwrap_or(0);
            maps.insert(name.clone(), n);
            hashes.push(name);
        } else {
            maps.insert(name, max);
        }
    }
    (maps, hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_and_meminfo_fields() {
        let s =
            "sockets: used 20\nTCP: inuse 7 orphan 1 tw 30 alloc 9 mem 12\nUDP: inuse 0 mem 0\n";
        assert_eq!(sockstat(s, "inuse"), 7);
        assert_eq!(sockstat(s, "tw"), 30);
        assert_eq!(sockstat(s, "mem"), 12);
        assert_eq!(
            field("MemFree: 10 kB\nSlab:   345 kB\n", "Slab:"),
            Some(345)
        );
    }
}
