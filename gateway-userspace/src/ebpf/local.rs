//! Loading side of the node-local shortcut (`--local-shortcut`, off by default): the
//! `sk_msg` program on `GW_LOCAL`, the `sock_ops` program on the cgroup v2 root, and
//! typed handles on the shortcut's maps. Without the flag none of this is attached and
//! the maps are created with one entry each (see `docs/datapath.md`, "Node-local
//! shortcut").
use std::{
    collections::BTreeSet,
    fs, io,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, SkMsg, SockOps},
};
use gateway_common::{
    GW_LOCAL, GW_LOCAL_ADDRS, GW_LOCAL_PAIRS, GW_LOCAL_STATE, GW_LOCAL_STATS, LocalKey, LocalPair,
    LocalState, LocalStats, MAX_LOCAL_ADDRS, PROG_LOCAL_MSG, PROG_LOCAL_OPS,
};

use super::{LoadError, LoadOptions, MapOpError, lock, take};

/// Where the `sock_ops` program is attached: the cgroup v2 root, so every process of
/// the node is seen (the program itself keeps only the agent's network namespace).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup v2 root: [`CGROUP_ROOT`] on a unified hierarchy, else the first
/// `cgroup2` mount in `/proc/self/mounts` (a hybrid host mounts it at
/// `/sys/fs/cgroup/unified`). [`CGROUP_ROOT`] when none is found (the attach then says
/// why it fails).
pub fn cgroup2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let cgroup2: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then_some(dir)
        })
        .collect();
    if cgroup2.contains(&CGROUP_ROOT) {
        return PathBuf::from(CGROUP_ROOT);
    }
    cgroup2
        .first()
        .map_or_else(|| PathBuf::from(CGROUP_ROOT), PathBuf::from)
}

/// `SO_NETNS_COOKIE` (Linux 5.14; include/uapi/asm-generic/socket.h).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The network namespace cookie of the agent's namespace (of a throwaway socket).
pub fn netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap_or(8);
    // SAFETY: getsockopt on a valid fd into a u64 of the length given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Before the object is loaded: the agent's network namespace cookie for the
/// `sock_ops` program when the shortcut is `on`; when it is off, 0 (the program takes
/// no socket) and the shortcut's maps sized to one entry each.
pub(super) fn prepare(loader: &mut EbpfLoader<'_>, on: bool) -> Result<u64, LoadError> {
    if on {
        return netns_cookie().map_err(|e| LoadError::Program {
            name: PROG_LOCAL_OPS,
            source: aya::programs::ProgramError::IOError(e),
        });
    }
    for name in [GW_LOCAL, GW_LOCAL_STATE, GW_LOCAL_PAIRS, GW_LOCAL_ADDRS] {
        loader.map_max_entries(name, 1);
    }
    Ok(0)
}

/// The IPv4 addresses of the interfaces of the agent's network namespace (loopback's
/// included; 127.0.0.0/8 needs no entry, the program takes it as the node's).
pub fn node_ipv4_addrs() -> io::Result<BTreeSet<Ipv4Addr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|a| {
            a.address?
                .as_sockaddr_in()
                .map(nix::sys::socket::SockaddrIn::ip)
        })
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect())
}

/// The shortcut's maps, as the agent uses them.
pub struct LocalMaps {
    /// `GW_LOCAL_ADDRS` and the addresses written to it.
    addrs: Mutex<(HashMap<MapData, u32, u8>, BTreeSet<Ipv4Addr>)>,
    state: Mutex<HashMap<MapData, LocalKey, LocalState>>,
    pairs: Mutex<HashMap<MapData, LocalKey, LocalPair>>,
    /// `GW_LOCAL_STATS`, read through its pin (`sockgate status`); held here so the
    /// map lives as long as the agent's handle on it.
    _stats: PerCpuArray<MapData, LocalStats>,
    /// Pin of `GW_LOCAL_STATS`, removed when the maps are dropped.
    stats_pin: Option<PathBuf>,
}

impl Drop for LocalMaps {
    fn drop(&mut self) {
        if let Some(p) = &self.stats_pin {
            let _ = fs::remove_file(p);
        }
    }
}

impl LocalMaps {
    /// Takes the shortcut's maps out of the object when it is on
    /// ([`LoadOptions::local_shortcut`]): loads the `sk_msg` program onto `GW_LOCAL`,
    /// the `sock_ops` program onto the cgroup (a `bpf_link`, released with the object
    /// or the process), and pins `GW_LOCAL_STATS` in the pin directory.
    pub(super) fn take(ebpf: &mut Ebpf, opts: &LoadOptions) -> Result<Option<Self>, LoadError> {
        let Some(cgroup) = opts.local_shortcut.as_deref() else {
            return Ok(None);
        };
        let pin_dir = opts.pin_dir.as_path();
        let program = |name: &'static str| move |source| LoadError::Program { name, source };
        let local: SockHash<MapData, LocalKey> = take(ebpf, GW_LOCAL)?;
        let local_fd = local.fd().try_clone().map_err(|e| LoadError::Map {
            name: GW_LOCAL,
            source: aya::maps::MapError::IoError(e),
        })?;
        {
            let prog: &mut SkMsg = ebpf
                .program_mut(PROG_LOCAL_MSG)
                .ok_or(LoadError::Missing(PROG_LOCAL_MSG))?
                .try_into()
                .map_err(program(PROG_LOCAL_MSG))?;
            prog.load().map_err(program(PROG_LOCAL_MSG))?;
            prog.attach(&local_fd).map_err(program(PROG_LOCAL_MSG))?;
        }
        {
            let cg = fs::File::open(cgroup).map_err(|e| LoadError::Program {
                name: PROG_LOCAL_OPS,
                source: aya::programs::ProgramError::IOError(io::Error::new(
                    e.kind(),
                    format!("cgroup {}: {e}", cgroup.display()),
                )),
            })?;
            let prog: &mut SockOps = ebpf
                .program_mut(PROG_LOCAL_OPS)
                .ok_or(LoadError::Missing(PROG_LOCAL_OPS))?
                .try_into()
                .map_err(program(PROG_LOCAL_OPS))?;
            prog.load().map_err(program(PROG_LOCAL_OPS))?;
            // A cgroup bpf_link takes no flags (`cgroup_bpf_link_attach()` refuses any
            // with EINVAL) and always runs beside the cgroup's other programs: aya
            // passes `Single` as 0.
            prog.attach(&cg, CgroupAttachMode::Single)
                .map_err(program(PROG_LOCAL_OPS))?;
        }
        let pin = pin_dir.join(GW_LOCAL_STATS);
        let _ = fs::remove_file(&pin);
        let pinned = ebpf
            .map(GW_LOCAL_STATS)
            .ok_or(LoadError::Missing(GW_LOCAL_STATS))?
            .pin(&pin);
        let stats: PerCpuArray<MapData, LocalStats> = take(ebpf, GW_LOCAL_STATS)?;
        let stats_pin = match pinned {
            Ok(()) => Some(pin),
            Err(e) => {
                tracing::warn!(error = %e, path = %pin.display(), "cannot pin GW_LOCAL_STATS");
                None
            }
        };
        tracing::info!(
            cgroup = %cgroup.display(),
            "node-local shortcut on: sock_ops on the cgroup, sk_msg on GW_LOCAL"
        );
        let maps = Self {
            addrs: Mutex::new((take(ebpf, GW_LOCAL_ADDRS)?, BTreeSet::new())),
            state: Mutex::new(take(ebpf, GW_LOCAL_STATE)?),
            pairs: Mutex::new(take(ebpf, GW_LOCAL_PAIRS)?),
            _stats: stats,
            stats_pin,
        };
        // Before the first client can connect: without its addresses the program
        // takes only clients of 127.0.0.0/8.
        match node_ipv4_addrs() {
            Ok(addrs) => {
                if let Err(e) = maps.set_node_addrs(&addrs) {
                    tracing::warn!(error = %e, "node-local shortcut: node addresses not written");
                }
            }
            Err(e) => tracing::warn!(error = %e, "node-local shortcut: cannot list addresses"),
        }
        Ok(Some(maps))
    }

    /// Makes `addrs` the node's addresses for the `sock_ops` program (adds the new,
    /// removes the gone); true when anything changed. At most [`MAX_LOCAL_ADDRS`].
    pub fn set_node_addrs(&self, addrs: &BTreeSet<Ipv4Addr>) -> Result<bool, MapOpError> {
        let mut guard = lock(&self.addrs);
        let (map, written) = &mut *guard;
        if written == addrs {
            return Ok(false);
        }
        let err = |source| MapOpError {
            map: GW_LOCAL_ADDRS,
            source,
        };
        for gone in written.difference(addrs) {
            let _ = map.remove(&u32::from(*gone).to_be());
        }
        written.retain(|a| addrs.contains(a));
        let new: Vec<Ipv4Addr> = addrs.difference(written).copied().collect();
        for a in new {
            if written.len() >= MAX_LOCAL_ADDRS as usize {
                break;
            }
            map.insert(u32::from(a).to_be(), 1, 0).map_err(err)?;
            written.insert(a);
        }
        Ok(true)
    }

    /// Whether the `sock_ops` program takes a client at `addr` as node-local: 127.0.0.0/8
    /// or an address last written to `GW_LOCAL_ADDRS`. Lets the agent skip the map
    /// lookup of [`Self::state`] for remote clients.
    pub fn is_node_addr(&self, addr: Ipv4Addr) -> bool {
        addr.is_loopback() || lock(&self.addrs).1.contains(&addr)
    }

    /// The node's addresses as last written for the `sock_ops` program.
    pub fn node_addrs(&self) -> Vec<IpAddr> {
        lock(&self.addrs).1.iter().map(|a| IpAddr::V4(*a)).collect()
    }

    /// What the `sk_msg` program did with the client's sends so far; `None` when the
    /// `sock_ops` program did not take a client socket with this tuple.
    pub fn state(&self, key: &LocalKey) -> Option<LocalState> {
        lock(&self.state).get(key, 0).ok()
    }

    /// Lets the `sk_msg` program redirect the client's sends to the pair's backend.
    pub fn set_pair(&self, key: LocalKey, pair: LocalPair) -> Result<(), MapOpError> {
        lock(&self.pairs)
            .insert(key, pair, 0)
            .map_err(|source| MapOpError {
                map: GW_LOCAL_PAIRS,
                source,
            })
    }

    /// Removes the client's pair entry (the pair ended).
    pub fn remove_pair(&self, key: &LocalKey) {
        let _ = lock(&self.pairs).remove(key);
    }
}
