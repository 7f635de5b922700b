//! The embedded eBPF object: loading, pinning, the pin compatibility check, and the
//! typed handles the agent uses to write the maps.
//!
//! Maps are pinned under a directory of bpffs (default `/sys/fs/bpf/sockgate`), one
//! file per map named as in the object (`GW_LISTENERS`, ...). Before a pin is reused its
//! type, key size, value size and max entries are compared with what this build
//! declares (as cilium/ebpf's `MapSpec.Compatible` does); a pin that does not match is
//! replaced, with a log line saying why, or refused when [`PinMismatch::Fail`] is asked.
use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, MapData, MapInfo, MapType, PerCpuHashMap, PerCpuValues, RingBuf, SockHash,
        lpm_trie::Key as LpmKey,
    },
    programs::{
        ProgramError, SchedClassifier, SkSkb, Xdp,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions, TcAttachType},
        xdp::XdpLink,
    },
};
use gateway_common::{
    Backend, BackendKey, Bucket, BucketKey, Cidr4, Cidr6, FWD_EVENTS_BYTES, FWD_MAX_ATTEMPTS, Flow,
    FlowKey, FwdEvent, FwdStats, GLOBAL_COPIED_SEQ_OFFSET, GLOBAL_FWD_ATTEMPTS,
    GLOBAL_FWD_PORT_COUNT, GLOBAL_FWD_PORT_MIN, GLOBAL_FWD_PRESERVE_CLIENT, GLOBAL_SKB_CB_OFFSET,
    GLOBAL_WRITE_SEQ_OFFSET, GW_BACKENDS, GW_FWD_ADDRS, GW_FWD_EVENTS, GW_FWD_FLOWS, GW_FWD_IFACES,
    GW_FWD_SLOTS, GW_FWD_STATS, GW_LISTENERS, GW_PEERS, GW_SOCKS, GW_STATS, GW_XDP_BUCKETS,
    GW_XDP_CIDR4, GW_XDP_CIDR6, GW_XDP_POLICY, GW_XDP_STATS, ListenerInfo, ListenerKey,
    ListenerStats, MAP_NAMES, MAX_BACKENDS, MAX_FLOWS, MAX_FWD_IFACES, MAX_LISTENERS,
    MAX_NODE_ADDRS, MAX_SOCKETS, MAX_STATS, MAX_XDP_BUCKETS, MAX_XDP_CIDRS, NodeAddr, PROG_FWD,
    PROG_VERDICT, PROG_XDP, Peer, SlotTable, StatsKey, XdpPolicy, XdpStats,
};

pub mod local;
mod sockmap_progs;

use crate::xdp::{GuardMaps, ListenerGuard, XdpError, XdpKind};
use tracing::{info, warn};

/// The eBPF object built by `build.rs` from `gateway-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sockgate";
/// Where the kernel exposes its own BTF.
pub const DEFAULT_KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
/// `statfs.f_type` of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors of loading the programs and pinning the maps.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "missing privileges: {missing} (run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
    )]
    Privileges { missing: String },
    #[error(
        "kernel has no BTF ({path} does not exist): sockgate needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf { path: PathBuf },
    #[error("cannot mount bpffs on {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "incompatible pinned map {path}: {reason} (remove it, or run with --on-pin-mismatch replace)"
    )]
    IncompatiblePin { path: PathBuf, reason: String },
    #[error("pinned map {path} cannot be replaced: {source}")]
    ReplacePin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("kernel BTF: {0}")]
    Btf(#[from] crate::btf::BtfError),
    #[error("XDP listener guard: {0}")]
    Xdp(#[from] XdpError),
}

pub use crate::map_error::MapOpError;

/// What to do with a pinned map whose layout differs from this build's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PinMismatch {
    /// Remove the old pin (with a log line) and pin a new map.
    #[default]
    Replace,
    /// Refuse to start.
    Fail,
}

/// How to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Directory on bpffs for the pins.
    pub pin_dir: PathBuf,
    /// Leave the pins in place when [`Datapath`] is dropped.
    pub keep_pins: bool,
    /// What to do with an incompatible pin.
    pub on_mismatch: PinMismatch,
    /// The kernel BTF file whose presence is required.
    pub kernel_btf: PathBuf,
    /// The forward path's settings that are fixed at load time.
    pub forward: ForwardLoad,
    /// Sizes of the listener and backend maps.
    pub capacity: Capacity,
    /// The node-local shortcut (`--local-shortcut`): the cgroup its `sock_ops` program goes
    /// on, or `None` to attach nothing (the default).
    pub local_shortcut: Option<PathBuf>,
}

/// Sizes of the maps that hold listeners and backends, set at load time
/// (`--max-listeners`, `--max-backends`). A pin of another size is replaced (or
/// refused), as any incompatible pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Entries of `GW_LISTENERS` and of every map keyed by listener port
    /// (`GW_FWD_SLOTS`, `GW_FWD_STATS`, `GW_XDP_POLICY`, `GW_XDP_STATS`); `GW_STATS`
    /// has two per listener.
    pub listeners: u32,
    /// Entries of `GW_BACKENDS`.
    pub backends: u32,
    /// Entries of `GW_SOCKS` and `GW_PEERS` (`--max-sockets`): two per kernel-path
    /// connection; the connections that find them full take splice.
    pub sockets: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            listeners: MAX_LISTENERS,
            backends: MAX_BACKENDS,
            sockets: MAX_SOCKETS,
        }
    }
}

impl Capacity {
    /// The max entries of map `name` at this capacity with a connection table of
    /// `flows` entries; `None` for the maps of a fixed size.
    fn max_entries(self, name: &str, flows: u32) -> Option<u32> {
        let listeners = self.listeners.max(1);
        match name {
            GW_LISTENERS | GW_FWD_SLOTS | GW_FWD_STATS | GW_XDP_POLICY | GW_XDP_STATS => {
                Some(listeners)
            }
            GW_STATS => Some(listeners.saturating_mul(2)),
            GW_BACKENDS => Some(self.backends.max(1)),
            GW_FWD_FLOWS => Some(flows),
            GW_SOCKS | GW_PEERS => Some(self.sockets.max(2)),
            _ => None,
        }
    }
}

/// What the forward program is loaded with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardLoad {
    /// Capacity of `GW_FWD_FLOWS` (two entries per connection).
    pub table_size: u32,
    /// First NAT port.
    pub port_min: u16,
    /// Last NAT port.
    pub port_max: u16,
    /// Backends tried per client connection.
    pub attempts: u32,
    /// Keep the client's address (no SNAT).
    pub preserve_client: bool,
}

impl ForwardLoad {
    /// The read-only globals of `gw_fwd` and their values.
    fn globals(self) -> [(&'static str, u32); 4] {
        [
            (GLOBAL_FWD_PORT_MIN, u32::from(self.port_min)),
            (
                GLOBAL_FWD_PORT_COUNT,
                u32::from(self.port_max.saturating_sub(self.port_min)) + 1,
            ),
            (
                GLOBAL_FWD_ATTEMPTS,
                self.attempts.clamp(1, FWD_MAX_ATTEMPTS),
            ),
            (GLOBAL_FWD_PRESERVE_CLIENT, u32::from(self.preserve_client)),
        ]
    }
}

impl Default for ForwardLoad {
    fn default() -> Self {
        Self {
            table_size: MAX_FLOWS,
            port_min: 61000,
            port_max: 65535,
            attempts: 3,
            preserve_client: false,
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            keep_pins: false,
            on_mismatch: PinMismatch::Replace,
            kernel_btf: PathBuf::from(DEFAULT_KERNEL_BTF),
            forward: ForwardLoad::default(),
            capacity: Capacity::default(),
            local_shortcut: None,
        }
    }
}

/// Type and sizes of a map, as this build declares it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

const fn size32<T>() -> u32 {
    size_of::<T>() as u32
}

/// The maps of this build, as [`MAP_NAMES`] orders them, sized for `capacity` with a
/// connection table of `flows` entries.
pub fn map_specs(capacity: Capacity, flows: u32) -> [MapSpec; 16] {
    let mut specs = declared_specs();
    for s in &mut specs {
        if let Some(n) = capacity.max_entries(s.name, flows) {
            s.max_entries = n;
        }
    }
    specs
}

/// The maps as the object declares them (the default sizes).
const fn declared_specs() -> [MapSpec; 16] {
    let s = MAP_SPECS;
    [
        s[0],
        s[1],
        s[2],
        s[3],
        s[4],
        s[5],
        s[6],
        s[7],
        s[8],
        s[9],
        MapSpec {
            name: GW_FWD_FLOWS,
            map_type: MapType::Hash,
            key_size: size32::<FlowKey>(),
            value_size: size32::<Flow>(),
            max_entries: MAX_FLOWS,
        },
        MapSpec {
            name: GW_FWD_SLOTS,
            map_type: MapType::Hash,
            key_size: size32::<ListenerKey>(),
            value_size: size32::<SlotTable>(),
            max_entries: MAX_LISTENERS,
        },
        MapSpec {
            name: GW_FWD_ADDRS,
            map_type: MapType::Hash,
            key_size: size32::<NodeAddr>(),
            value_size: size32::<u32>(),
            max_entries: MAX_NODE_ADDRS,
        },
        MapSpec {
            name: GW_FWD_STATS,
            map_type: MapType::PerCpuHash,
            key_size: size32::<ListenerKey>(),
            value_size: size32::<FwdStats>(),
            max_entries: MAX_LISTENERS,
        },
        MapSpec {
            name: GW_FWD_IFACES,
            map_type: MapType::Hash,
            key_size: size32::<u32>(),
            value_size: size32::<u32>(),
            max_entries: MAX_FWD_IFACES,
        },
        MapSpec {
            name: GW_FWD_EVENTS,
            map_type: MapType::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: FWD_EVENTS_BYTES,
        },
    ]
}

/// The socket path's and the XDP guard's maps, as [`MAP_NAMES`] orders them.
const MAP_SPECS: [MapSpec; 10] = [
    MapSpec {
        name: GW_LISTENERS,
        map_type: MapType::Hash,
        key_size: size32::<ListenerKey>(),
        value_size: size32::<ListenerInfo>(),
        max_entries: MAX_LISTENERS,
    },
    MapSpec {
        name: GW_BACKENDS,
        map_type: MapType::Hash,
        key_size: size32::<BackendKey>(),
        value_size: size32::<Backend>(),
        max_entries: MAX_BACKENDS,
    },
    MapSpec {
        name: GW_SOCKS,
        map_type: MapType::SockHash,
        key_size: size32::<u64>(),
        value_size: size32::<u32>(),
        max_entries: MAX_SOCKETS,
    },
    MapSpec {
        name: GW_PEERS,
        map_type: MapType::Hash,
        key_size: size32::<u64>(),
        value_size: size32::<Peer>(),
        max_entries: MAX_SOCKETS,
    },
    MapSpec {
        name: GW_STATS,
        map_type: MapType::PerCpuHash,
        key_size: size32::<StatsKey>(),
        value_size: size32::<ListenerStats>(),
        max_entries: MAX_STATS,
    },
    MapSpec {
        name: GW_XDP_POLICY,
        map_type: MapType::Hash,
        key_size: size32::<ListenerKey>(),
        value_size: size32::<XdpPolicy>(),
        max_entries: MAX_LISTENERS,
    },
    MapSpec {
        name: GW_XDP_CIDR4,
        map_type: MapType::LpmTrie,
        key_size: size32::<LpmKey<Cidr4>>(),
        value_size: size32::<u32>(),
        max_entries: MAX_XDP_CIDRS,
    },
    MapSpec {
        name: GW_XDP_CIDR6,
        map_type: MapType::LpmTrie,
        key_size: size32::<LpmKey<Cidr6>>(),
        value_size: size32::<u32>(),
        max_entries: MAX_XDP_CIDRS,
    },
    MapSpec {
        name: GW_XDP_BUCKETS,
        map_type: MapType::LruHash,
        key_size: size32::<BucketKey>(),
        value_size: size32::<Bucket>(),
        max_entries: MAX_XDP_BUCKETS,
    },
    MapSpec {
        name: GW_XDP_STATS,
        map_type: MapType::PerCpuHash,
        key_size: size32::<ListenerKey>(),
        value_size: size32::<XdpStats>(),
        max_entries: MAX_LISTENERS,
    },
];

impl MapSpec {
    /// Why a pinned map with `info` cannot stand for this one, or `None` when it can.
    pub fn incompatibility(&self, info: &MapInfo) -> Option<String> {
        let actual_type = info.map_type().ok();
        if actual_type != Some(self.map_type) {
            return Some(format!("type {actual_type:?}, want {:?}", self.map_type));
        }
        let pairs = [
            ("key size", info.key_size(), self.key_size),
            ("value size", info.value_size(), self.value_size),
            ("max entries", info.max_entries(), self.max_entries),
        ];
        pairs
            .iter()
            .find(|(_, got, want)| got != want)
            .map(|(what, got, want)| format!("{what} {got}, want {want}"))
    }
}

/// Checks that this process may load programs: `CAP_BPF` (or `CAP_SYS_ADMIN`) and
/// `CAP_NET_ADMIN` in the effective set.
pub fn check_privileges() -> Result<(), LoadError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(LoadError::Privileges {
            missing: missing.join(", "),
        })
    }
}

/// Mounts bpffs on `/sys/fs/bpf` when `dir` is below it and it is not bpffs yet, then
/// creates `dir`.
fn ensure_pin_dir(dir: &Path) -> Result<(), LoadError> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) {
        let is_bpffs =
            nix::sys::statfs::statfs(root).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
        if !is_bpffs {
            info!(path = %root.display(), "mounting bpffs");
            nix::mount::mount(
                Some("bpf"),
                root,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|source| LoadError::MountBpffs {
                path: root.to_path_buf(),
                source,
            })?;
        }
    }
    fs::create_dir_all(dir).map_err(|source| LoadError::PinDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Checks the pin of `spec` in `dir`: keeps a compatible one, removes (or refuses) an
/// incompatible one. Returns whether a pin is reused.
fn check_pin(dir: &Path, spec: &MapSpec, on_mismatch: PinMismatch) -> Result<bool, LoadError> {
    let path = dir.join(spec.name);
    if fs::symlink_metadata(&path).is_err() {
        return Ok(false);
    }
    let reason = match MapInfo::from_pin(&path) {
        Ok(info) => spec.incompatibility(&info),
        Err(e) => Some(format!("not a readable map pin ({e})")),
    };
    let Some(reason) = reason else {
        info!(map = spec.name, path = %path.display(), "reusing pinned map");
        return Ok(true);
    };
    match on_mismatch {
        PinMismatch::Fail => Err(LoadError::IncompatiblePin { path, reason }),
        PinMismatch::Replace => {
            warn!(map = spec.name, path = %path.display(), %reason, "replacing incompatible pinned map");
            fs::remove_file(&path).map_err(|source| LoadError::ReplacePin { path, source })?;
            Ok(false)
        }
    }
}

/// Checks the pin of every map of `specs` ([`check_pin`]); returns the maps whose pin
/// is reused.
fn check_pins(
    dir: &Path,
    specs: &[MapSpec],
    on_mismatch: PinMismatch,
) -> Result<Vec<&'static str>, LoadError> {
    let mut reused = Vec::new();
    for spec in specs {
        if check_pin(dir, spec, on_mismatch)? {
            reused.push(spec.name);
        }
    }
    Ok(reused)
}

/// Typed handles on the maps, each behind its own lock (map syscalls are short).
pub struct Maps {
    pub listeners: Mutex<HashMap<MapData, ListenerKey, ListenerInfo>>,
    pub backends: Mutex<HashMap<MapData, BackendKey, Backend>>,
    pub socks: Mutex<SockHash<MapData, u64>>,
    pub peers: Mutex<HashMap<MapData, u64, Peer>>,
    pub stats: Mutex<PerCpuHashMap<MapData, StatsKey, ListenerStats>>,
    /// The XDP guard's maps, with the guards programmed now by listener port.
    pub guard: Mutex<(GuardMaps, BTreeMap<u16, ListenerGuard>)>,
    /// The forward path's connection table.
    pub flows: Mutex<HashMap<MapData, FlowKey, Flow>>,
    /// The forward path's selection tables.
    pub slots: Mutex<HashMap<MapData, ListenerKey, SlotTable>>,
    /// The node's addresses the forward path answers on.
    pub node_addrs: Mutex<HashMap<MapData, NodeAddr, u32>>,
    /// The forward path's counters.
    pub fwd_stats: Mutex<PerCpuHashMap<MapData, ListenerKey, FwdStats>>,
    /// The interfaces the forward program is attached to.
    pub fwd_ifaces: Mutex<HashMap<MapData, u32, u32>>,
    /// The forward program's connection ends (read by `crate::forward::events`).
    pub fwd_events: Mutex<RingBuf<MapData>>,
    /// Another handle on the same ring buffer, to pin it again.
    fwd_events_pin: MapData,
}

impl Maps {
    /// Takes the typed handles out of the loaded object (`socks` is taken already).
    fn take(ebpf: &mut Ebpf, socks: SockHash<MapData, u64>) -> Result<Self, LoadError> {
        let map_err = |source| LoadError::Map {
            name: GW_FWD_EVENTS,
            source,
        };
        let events: RingBuf<MapData> = take(ebpf, GW_FWD_EVENTS)?;
        let events_fd = std::os::fd::AsFd::as_fd(&events)
            .try_clone_to_owned()
            .map_err(|e| map_err(aya::maps::MapError::IoError(e)))?;
        Ok(Self {
            listeners: Mutex::new(take(ebpf, GW_LISTENERS)?),
            backends: Mutex::new(take(ebpf, GW_BACKENDS)?),
            socks: Mutex::new(socks),
            peers: Mutex::new(take(ebpf, GW_PEERS)?),
            stats: Mutex::new(take(ebpf, GW_STATS)?),
            guard: Mutex::new((GuardMaps::take(ebpf)?, BTreeMap::new())),
            flows: Mutex::new(take(ebpf, GW_FWD_FLOWS)?),
            slots: Mutex::new(take(ebpf, GW_FWD_SLOTS)?),
            node_addrs: Mutex::new(take(ebpf, GW_FWD_ADDRS)?),
            fwd_stats: Mutex::new(take(ebpf, GW_FWD_STATS)?),
            fwd_ifaces: Mutex::new(take(ebpf, GW_FWD_IFACES)?),
            fwd_events: Mutex::new(events),
            fwd_events_pin: MapData::from_fd(events_fd).map_err(map_err)?,
        })
    }
}

/// The `log` target of the programs' aya-log records (the eBPF crate's name).
pub const KERNEL_LOG_TARGET: &str = "gateway";

/// The loaded and attached programs, and their maps.
pub struct Datapath {
    // Owns the programs and their attachments: dropping it detaches them. The XDP
    // guard's links are owned by the attachment manager (`attach`).
    ebpf: Mutex<Ebpf>,
    pub maps: Maps,
    /// Records of `aya-log` from the programs, until [`Datapath::forward_kernel_logs`]
    /// takes them.
    kernel_logs: Mutex<Option<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    pin_dir: PathBuf,
    keep_pins: bool,
    /// Guards from the command line, by listener port.
    static_guards: Mutex<BTreeMap<u16, ListenerGuard>>,
    /// Maps found pinned and reused rather than created.
    pub reused: Vec<&'static str>,
    /// The node-local shortcut's maps, when it is on.
    pub local: Option<local::LocalMaps>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::Missing(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

/// Deletes the pairs an earlier agent left in a reused `GW_PEERS`: its sockets are
/// gone (the kernel removed them from `GW_SOCKS` when they closed), so their peer
/// entries must not linger.
fn remove_stale_peers(maps: &Maps) {
    let mut peers = lock(&maps.peers);
    let stale: Vec<u64> = peers.keys().filter_map(Result::ok).collect();
    for k in &stale {
        let _ = peers.remove(k);
    }
    if !stale.is_empty() {
        info!(
            entries = stale.len(),
            "removed stale GW_PEERS entries of an earlier run"
        );
    }
}

/// Empties the XDP guard's policy maps (an earlier run's, in reused pins: the agent
/// programs them again). The guard is attached by `crate::attach`.
fn start_guard(maps: &Maps) {
    let stale = lock(&maps.guard).0.clear();
    if stale > 0 {
        info!(
            entries = stale,
            "removed XDP guard entries of an earlier run"
        );
    }
}

/// A link error as a program error (aya keeps the two apart).
fn link_error(e: &aya::programs::links::LinkError) -> ProgramError {
    ProgramError::IOError(io::Error::other(e.to_string()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The kernel struct offsets the verdict program reads, from the running kernel's BTF,
/// by the name of the read-only global that holds each:
/// * the peer's `tcp_sock.write_seq` bounds what is queued towards it;
/// * `TCP_SKB_CB(skb)->seq` (at the start of `sk_buff.cb`), against what the verdict
///   handed on so far (starting from the socket's `tcp_sock.copied_seq`), finds the
///   head of a retransmitted segment that repeats bytes already handed on.
fn kernel_offsets(btf: &Path) -> Result<[(&'static str, u32); 3], LoadError> {
    use crate::btf::member_offset;
    Ok([
        (
            GLOBAL_WRITE_SEQ_OFFSET,
            member_offset(btf, "tcp_sock", "write_seq")?,
        ),
        (
            GLOBAL_COPIED_SEQ_OFFSET,
            member_offset(btf, "tcp_sock", "copied_seq")?,
        ),
        (GLOBAL_SKB_CB_OFFSET, member_offset(btf, "sk_buff", "cb")?),
    ])
}

impl Datapath {
    /// Checks privileges and BTF, pins the maps (reusing compatible pins), loads the
    /// verdict program and attaches it to `GW_SOCKS`.
    pub fn load(opts: &LoadOptions) -> Result<Self, LoadError> {
        check_privileges()?;
        if !opts.kernel_btf.exists() {
            return Err(LoadError::NoBtf {
                path: opts.kernel_btf.clone(),
            });
        }
        ensure_pin_dir(&opts.pin_dir)?;
        let specs = map_specs(opts.capacity, opts.forward.table_size);
        let reused = check_pins(&opts.pin_dir, &specs, opts.on_mismatch)?;
        let offsets = kernel_offsets(&opts.kernel_btf)?;
        let mut loader = EbpfLoader::new();
        for (global, offset) in &offsets {
            loader.override_global(global, offset, true);
        }
        for name in MAP_NAMES {
            loader.map_pin_path(name, opts.pin_dir.join(name));
        }
        let fwd = opts.forward.globals();
        for spec in &specs {
            loader.map_max_entries(spec.name, spec.max_entries);
        }
        for (name, value) in &fwd {
            loader.override_global(name, value, true);
        }
        // Kernel-side filter of the programs' aya-log records: debug records (a failed
        // redirect) are emitted only when the agent would print them.
        let level = if tracing::enabled!(target: KERNEL_LOG_TARGET, tracing::Level::DEBUG) {
            aya_log::Level::Debug
        } else {
            aya_log::Level::Warn
        } as u8;
        loader.override_global(aya_log::LEVEL, &level, true);
        let netns = local::prepare(&mut loader, opts.local_shortcut.is_some())?;
        loader.override_global(gateway_common::GLOBAL_LOCAL_NETNS_COOKIE, &netns, true);
        let mut ebpf = loader.load(OBJECT)?;
        let kernel_logs = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "eBPF log records unavailable");
                None
            }
        };
        let socks: SockHash<MapData, u64> = take(&mut ebpf, GW_SOCKS)?;
        let sock_fd = socks.fd().try_clone().map_err(|e| LoadError::Map {
            name: GW_SOCKS,
            source: aya::maps::MapError::IoError(e),
        })?;
        {
            let prog: &mut SkSkb = ebpf
                .program_mut(PROG_VERDICT)
                .ok_or(LoadError::Missing(PROG_VERDICT))?
                .try_into()
                .map_err(|source| LoadError::Program {
                    name: PROG_VERDICT,
                    source,
                })?;
            prog.load().map_err(|source| LoadError::Program {
                name: PROG_VERDICT,
                source,
            })?;
            prog.attach(&sock_fd).map_err(|source| LoadError::Program {
                name: PROG_VERDICT,
                source,
            })?;
        }
        // No sk_msg program: one on GW_SOCKS sends every byte of a paired socket
        // through tcp_bpf_sendmsg, and nothing needs one yet. An earlier agent's, left
        // on a reused GW_SOCKS when that agent was killed, is detached.
        match sockmap_progs::detach_all(&sock_fd, sockmap_progs::SK_MSG_VERDICT) {
            Ok(ids) if !ids.is_empty() => info!(
                programs = ?ids,
                "detached an earlier agent's sk_msg program from GW_SOCKS"
            ),
            Ok(_) => {}
            Err(e) => warn!(
                error = %e,
                "cannot check GW_SOCKS for an earlier agent's sk_msg program"
            ),
        }
        let maps = Maps::take(&mut ebpf, socks)?;
        let local = local::LocalMaps::take(&mut ebpf, opts)?;
        start_guard(&maps);
        if reused.contains(&GW_PEERS) {
            remove_stale_peers(&maps);
        }
        info!(
            pin_dir = %opts.pin_dir.display(),
            reused = ?reused,
            max_listeners = opts.capacity.listeners,
            max_backends = opts.capacity.backends,
            "eBPF programs loaded and attached"
        );
        Ok(Self {
            ebpf: Mutex::new(ebpf),
            maps,
            kernel_logs: Mutex::new(kernel_logs),
            pin_dir: opts.pin_dir.clone(),
            keep_pins: opts.keep_pins,
            static_guards: Mutex::new(BTreeMap::new()),
            reused,
            local,
        })
    }

    /// Forwards the programs' aya-log records to the agent's log until `shutdown`
    /// (target `gateway`, the eBPF crate). Call once, inside the runtime.
    pub async fn forward_kernel_logs(&self, shutdown: tokio_util::sync::CancellationToken) {
        let Some(logger) = lock(&self.kernel_logs).take() else {
            return;
        };
        // SAFETY: the logger owns its ring buffer's descriptor and keeps it open,
        // unchanged, for as long as it lives; the AsyncFd owns the logger.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "cannot poll eBPF log records");
                return;
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    fd.get_mut().flush();
                    return;
                }
                ready = fd.readable_mut() => match ready {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(e) => {
                        warn!(error = %e, "polling eBPF log records");
                        return;
                    }
                },
            }
        }
    }

    /// `gw_xdp`, loaded on first use.
    fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
        let prog: &mut Xdp = ebpf
            .program_mut(PROG_XDP)
            .ok_or(XdpError::Missing(PROG_XDP))?
            .try_into()
            .map_err(XdpError::Program)?;
        if prog.fd().is_err() {
            prog.load().map_err(XdpError::Program)?;
        }
        Ok(prog)
    }

    /// The kernel's id of `gw_xdp` (loading it on first use): what `ip link` and
    /// `bpftool net` show on an interface it is attached to.
    pub fn xdp_program_id(&self) -> Result<u32, XdpError> {
        let mut ebpf = lock(&self.ebpf);
        let prog = Self::xdp_program(&mut ebpf)?;
        prog.info().map(|i| i.id()).map_err(XdpError::Program)
    }

    /// Attaches `gw_xdp` to the interface of index `ifindex` in `mode`, as a bpf link
    /// owned by the caller: dropping it detaches the program, and the kernel detaches
    /// it when the agent dies or the interface goes away.
    pub fn attach_xdp(&self, ifindex: u32, mode: XdpKind) -> Result<XdpLink, ProgramError> {
        let mut ebpf = lock(&self.ebpf);
        let prog = Self::xdp_program(&mut ebpf).map_err(|e| match e {
            XdpError::Program(p) => p,
            other => ProgramError::IOError(io::Error::other(other.to_string())),
        })?;
        let id = prog.attach_to_if_index(ifindex, mode.into())?;
        prog.take_link(id)
    }

    /// `gw_fwd`, loaded on first use.
    fn fwd_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, ProgramError> {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_FWD)
            .ok_or_else(|| ProgramError::IOError(io::Error::other("no gw_fwd in the object")))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        Ok(prog)
    }

    /// The kernel's id of `gw_fwd` (loading it on first use).
    pub fn fwd_program_id(&self) -> Result<u32, ProgramError> {
        let mut ebpf = lock(&self.ebpf);
        let prog = Self::fwd_program(&mut ebpf)?;
        prog.info().map(|i| i.id())
    }

    /// Attaches `gw_fwd` to the tc ingress of `iface` as a tcx bpf link pinned at
    /// `pin` (so it outlives the agent). A link already pinned there (an earlier
    /// agent's) is taken over: its program is replaced by this one atomically, so no
    /// segment of a forwarded connection meets an interface without the program.
    /// Returns the pinned link and whether it took an earlier agent's over.
    pub fn attach_fwd(&self, iface: &str, pin: &Path) -> Result<(PinnedLink, bool), ProgramError> {
        let mut ebpf = lock(&self.ebpf);
        let prog = Self::fwd_program(&mut ebpf)?;
        let earlier = PinnedLink::from_pin(pin).ok();
        let adopted = earlier.is_some();
        let id = if let Some(old) = earlier {
            let link =
                SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| link_error(&e))?;
            let _ = fs::remove_file(pin);
            prog.attach_to_link(link)?
        } else {
            let _ = fs::remove_file(pin);
            prog.attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
            )?
        };
        let link = prog.take_link(id)?;
        let fd = FdLink::try_from(link).map_err(|e| link_error(&e))?;
        let pinned = fd
            .pin(pin)
            .map_err(|e| ProgramError::IOError(io::Error::other(e.to_string())))?;
        Ok((pinned, adopted))
    }

    /// Writes (or, with `None`, removes) the selection table of listener `port`;
    /// nothing is written when the map holds it already.
    pub fn set_slots(&self, port: u16, table: Option<&SlotTable>) -> Result<(), MapOpError> {
        let mut slots = lock(&self.maps.slots);
        let key = ListenerKey::new(port);
        let err = |source| MapOpError {
            map: GW_FWD_SLOTS,
            source,
        };
        match table {
            Some(t) => {
                if slots.get(&key, 0).ok().as_ref() == Some(t) {
                    return Ok(());
                }
                slots.insert(key, *t, 0).map_err(err)
            }
            None => match slots.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(err(e)),
            },
        }
    }

    /// Listener ports that have a selection table.
    pub fn slot_ports(&self) -> Vec<u16> {
        lock(&self.maps.slots)
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.port)
            .collect()
    }

    /// Makes `GW_FWD_ADDRS` hold exactly `addrs`.
    pub fn set_node_addrs(
        &self,
        addrs: &std::collections::BTreeSet<NodeAddr>,
    ) -> Result<(), MapOpError> {
        let mut m = lock(&self.maps.node_addrs);
        let err = |source| MapOpError {
            map: GW_FWD_ADDRS,
            source,
        };
        let have: Vec<NodeAddr> = m.keys().filter_map(Result::ok).collect();
        for a in &have {
            if !addrs.contains(a) {
                m.remove(a).map_err(err)?;
            }
        }
        for a in addrs {
            if !have.contains(a) {
                m.insert(*a, 1, 0).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Makes `GW_FWD_IFACES` hold exactly `ifindexes`.
    pub fn set_fwd_ifaces(
        &self,
        ifindexes: &std::collections::BTreeSet<u32>,
    ) -> Result<(), MapOpError> {
        let mut m = lock(&self.maps.fwd_ifaces);
        let err = |source| MapOpError {
            map: GW_FWD_IFACES,
            source,
        };
        let have: Vec<u32> = m.keys().filter_map(Result::ok).collect();
        for i in &have {
            if !ifindexes.contains(i) {
                m.remove(i).map_err(err)?;
            }
        }
        for i in ifindexes {
            if !have.contains(i) {
                m.insert(*i, 1, 0).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Every entry of the connection table.
    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        lock(&self.maps.flows)
            .iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// Deletes entries of the connection table (missing ones are fine).
    pub fn remove_flows(&self, keys: &[FlowKey]) {
        let mut m = lock(&self.maps.flows);
        for k in keys {
            let _ = m.remove(k);
        }
    }

    /// A descriptor of `GW_FWD_EVENTS` to wait on (readable when events are waiting).
    pub fn fwd_events_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&*lock(&self.maps.fwd_events)).try_clone_to_owned()
    }

    /// Takes the events waiting in `GW_FWD_EVENTS` (at most `max`; a record shorter
    /// than an event is skipped).
    pub fn take_fwd_events(&self, max: usize) -> Vec<FwdEvent> {
        let mut ring = lock(&self.maps.fwd_events);
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = ring.next() else {
                break;
            };
            if let Some(bytes) = item.get(..size_of::<FwdEvent>()) {
                out.push(bytemuck::pod_read_unaligned(bytes));
            }
        }
        out
    }

    /// The forward program's counters of `port`, summed over CPUs.
    pub fn fwd_stats(&self, port: u16) -> FwdStats {
        lock(&self.maps.fwd_stats)
            .get(&ListenerKey::new(port), 0)
            .map(|v| v.iter().fold(FwdStats::default(), FwdStats::add))
            .unwrap_or_default()
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Inserts both sockets of a pair in `GW_SOCKS` and their peer entries in
    /// `GW_PEERS`. Peers are written first so that the verdict finds them as soon as a
    /// socket is in the hash. On error nothing is left behind. `queue_limit` bounds
    /// the bytes the verdict may queue towards either socket ([`Peer::queue_limit`]).
    pub fn insert_pair(
        &self,
        client: (u64, &impl AsRawFd),
        backend: (u64, &impl AsRawFd),
        listener_port: u16,
        queue_limit: u32,
    ) -> Result<(), MapOpError> {
        let (c_cookie, c_fd) = client;
        let (b_cookie, b_fd) = backend;
        let c_peer = Peer {
            peer_cookie: b_cookie,
            listener_port,
            direction: gateway_common::DIR_CLIENT_TO_BACKEND,
            queue_limit,
            ..Peer::default()
        };
        let b_peer = Peer {
            peer_cookie: c_cookie,
            listener_port,
            direction: gateway_common::DIR_BACKEND_TO_CLIENT,
            queue_limit,
            ..Peer::default()
        };
        let result = (|| {
            let mut peers = lock(&self.maps.peers);
            peers
                .insert(c_cookie, c_peer, 0)
                .map_err(|source| MapOpError {
                    map: GW_PEERS,
                    source,
                })?;
            peers
                .insert(b_cookie, b_peer, 0)
                .map_err(|source| MapOpError {
                    map: GW_PEERS,
                    source,
                })?;
            drop(peers);
            let mut socks = lock(&self.maps.socks);
            socks
                .insert(b_cookie, b_fd.as_raw_fd(), 0)
                .map_err(|source| MapOpError {
                    map: GW_SOCKS,
                    source,
                })?;
            socks
                .insert(c_cookie, c_fd.as_raw_fd(), 0)
                .map_err(|source| MapOpError {
                    map: GW_SOCKS,
                    source,
                })
        })();
        if result.is_err() {
            self.remove_pair(c_cookie, b_cookie);
        }
        result
    }

    /// Removes a pair's `GW_PEERS` entries when it ends and its sockets are about to
    /// close: the kernel drops each socket from `GW_SOCKS` by itself when it closes
    /// (`sock_map_close()` in `net/core/sock_map.c`), so deleting them here too would be
    /// two syscalls more per connection. Until then the verdict finds no peer and
    /// passes what still arrives to the socket itself.
    pub fn remove_peers(&self, client_cookie: u64, backend_cookie: u64) {
        let mut peers = lock(&self.maps.peers);
        let _ = peers.remove(&client_cookie);
        let _ = peers.remove(&backend_cookie);
    }

    /// Removes a pair's entries from `GW_PEERS` and `GW_SOCKS` (missing ones are fine:
    /// the kernel drops a socket from the hash by itself when it closes).
    pub fn remove_pair(&self, client_cookie: u64, backend_cookie: u64) {
        {
            let mut peers = lock(&self.maps.peers);
            let _ = peers.remove(&client_cookie);
            let _ = peers.remove(&backend_cookie);
        }
        let mut socks = lock(&self.maps.socks);
        let _ = socks.remove(&client_cookie);
        let _ = socks.remove(&backend_cookie);
    }

    /// Writes a listener entry.
    pub fn set_listener(&self, key: ListenerKey, info: ListenerInfo) -> Result<(), MapOpError> {
        lock(&self.maps.listeners)
            .insert(key, info, 0)
            .map_err(|source| MapOpError {
                map: GW_LISTENERS,
                source,
            })
    }

    /// Removes a listener entry.
    pub fn remove_listener(&self, key: ListenerKey) -> Result<(), MapOpError> {
        match lock(&self.maps.listeners).remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(MapOpError {
                map: GW_LISTENERS,
                source,
            }),
        }
    }

    /// Writes a backend entry.
    pub fn set_backend(&self, key: BackendKey, backend: Backend) -> Result<(), MapOpError> {
        lock(&self.maps.backends)
            .insert(key, backend, 0)
            .map_err(|source| MapOpError {
                map: GW_BACKENDS,
                source,
            })
    }

    /// Removes a backend entry.
    pub fn remove_backend(&self, key: BackendKey) -> Result<(), MapOpError> {
        match lock(&self.maps.backends).remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(MapOpError {
                map: GW_BACKENDS,
                source,
            }),
        }
    }

    /// Keys currently in `GW_LISTENERS`.
    pub fn listener_keys(&self) -> Vec<ListenerKey> {
        lock(&self.maps.listeners)
            .keys()
            .filter_map(Result::ok)
            .collect()
    }

    /// Entries currently in `GW_LISTENERS`.
    pub fn listener_entries(&self) -> Vec<(ListenerKey, ListenerInfo)> {
        lock(&self.maps.listeners)
            .iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// Entries currently in `GW_BACKENDS`.
    pub fn backend_entries(&self) -> Vec<(BackendKey, Backend)> {
        lock(&self.maps.backends)
            .iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// Keys currently in `GW_BACKENDS`.
    pub fn backend_keys(&self) -> Vec<BackendKey> {
        lock(&self.maps.backends)
            .keys()
            .filter_map(Result::ok)
            .collect()
    }

    /// Bytes the verdict redirected from the socket `cookie` to its peer, `None` when
    /// the socket has no entry.
    pub fn bytes_redirected(&self, cookie: u64) -> Option<u64> {
        lock(&self.maps.peers)
            .get(&cookie, 0)
            .ok()
            .map(|p| p.bytes_redirected)
    }

    /// Bytes the verdict parked on the socket `cookie` (passed to its own receive
    /// queue for the agent to forward), `None` when the socket has no entry.
    pub fn bytes_passed(&self, cookie: u64) -> Option<u64> {
        lock(&self.maps.peers)
            .get(&cookie, 0)
            .ok()
            .map(|p| p.bytes_passed)
    }

    /// Number of entries in `GW_PEERS`.
    pub fn peer_count(&self) -> usize {
        lock(&self.maps.peers).keys().count()
    }

    /// Writes the agent-owned counters of a listener (CPU 0 holds them, the other CPUs
    /// zero), so that summing over CPUs gives the value.
    pub fn write_agent_stats(&self, port: u16, stats: ListenerStats) -> Result<(), MapOpError> {
        let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1));
        let mut values = vec![ListenerStats::default(); cpus];
        values[0] = stats;
        let values = PerCpuValues::try_from(values).map_err(|e| MapOpError {
            map: GW_STATS,
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            }),
        })?;
        lock(&self.maps.stats)
            .insert(StatsKey::new(port, gateway_common::OWNER_AGENT), values, 0)
            .map_err(|source| MapOpError {
                map: GW_STATS,
                source,
            })
    }

    /// Guards given on the command line (`--xdp-*`): they win over the guards of the
    /// desired state for their ports. Takes effect at the next [`Self::apply_guards`].
    pub fn set_static_guards(&self, guards: BTreeMap<u16, ListenerGuard>) {
        *lock(&self.static_guards) = guards;
    }

    /// Programs the XDP guard's maps to `guards` (plus the static ones), writing only
    /// the listeners whose guard changed.
    pub fn apply_guards(&self, guards: &BTreeMap<u16, ListenerGuard>) -> Result<(), MapOpError> {
        let mut want = guards.clone();
        want.extend(lock(&self.static_guards).clone());
        let mut g = lock(&self.maps.guard);
        let (maps, current) = &mut *g;
        let stale: Vec<u16> = current
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        for port in stale {
            maps.set_guard(port, current.get(&port), None)?;
            current.remove(&port);
        }
        for (port, new) in want {
            if current.get(&port) != Some(&new) {
                maps.set_guard(port, current.get(&port), Some(&new))?;
                current.insert(port, new);
            }
        }
        Ok(())
    }

    /// The XDP guard's counters of `port`, summed over CPUs.
    pub fn xdp_stats(&self, port: u16) -> XdpStats {
        lock(&self.maps.guard).0.stats(port)
    }

    /// Counters of `port`, summed over CPUs and owners.
    pub fn listener_stats(&self, port: u16) -> ListenerStats {
        let stats = lock(&self.maps.stats);
        [gateway_common::OWNER_KERNEL, gateway_common::OWNER_AGENT]
            .iter()
            .filter_map(|&owner| stats.get(&StatsKey::new(port, owner), 0).ok())
            .flat_map(|per_cpu| per_cpu.iter().copied().collect::<Vec<_>>())
            .fold(ListenerStats::default(), |acc, s| acc.add(&s))
    }
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("keep_pins", &self.keep_pins)
            .finish_non_exhaustive()
    }
}

/// Errors of pinning the maps again after their pins were removed.
#[derive(Debug, thiserror::Error)]
pub enum RepinError {
    #[error("pin directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinning {name}: {source}")]
    Pin {
        name: &'static str,
        #[source]
        source: aya::pin::PinError,
    },
}

impl Datapath {
    /// The maps whose pin is missing from the pin directory.
    pub fn missing_pins(&self) -> Vec<&'static str> {
        MAP_NAMES
            .into_iter()
            .filter(|name| !self.pin_dir.join(name).exists())
            .collect()
    }

    /// Pins `names` again (the pin directory is created again when it is gone): the
    /// agent holds every map, so removing the pins by hand loses no state, only the
    /// way `sockgate status`, `bpftool` and the next agent find them.
    pub fn repin(&self, names: &[&'static str]) -> Result<(), RepinError> {
        use aya::maps::IterableMap;
        fs::create_dir_all(&self.pin_dir).map_err(|source| RepinError::Dir {
            path: self.pin_dir.clone(),
            source,
        })?;
        for &name in names {
            let path = self.pin_dir.join(name);
            let m = &self.maps;
            let pinned = match name {
                GW_LISTENERS => lock(&m.listeners).map().pin(&path),
                GW_BACKENDS => lock(&m.backends).map().pin(&path),
                GW_SOCKS => lock(&m.socks).map().pin(&path),
                GW_PEERS => lock(&m.peers).map().pin(&path),
                GW_STATS => lock(&m.stats).map().pin(&path),
                GW_FWD_FLOWS => lock(&m.flows).map().pin(&path),
                GW_FWD_SLOTS => lock(&m.slots).map().pin(&path),
                GW_FWD_ADDRS => lock(&m.node_addrs).map().pin(&path),
                GW_FWD_STATS => lock(&m.fwd_stats).map().pin(&path),
                GW_FWD_IFACES => lock(&m.fwd_ifaces).map().pin(&path),
                GW_FWD_EVENTS => m.fwd_events_pin.pin(&path),
                _ => {
                    let guard = lock(&m.guard);
                    if let Some(data) = guard.0.map_data(name) {
                        data.pin(&path)
                    } else {
                        drop(guard);
                        match lock(&self.ebpf).map(name) {
                            Some(map) => map.pin(&path),
                            None => continue,
                        }
                    }
                }
            };
            pinned.map_err(|source| RepinError::Pin { name, source })?;
        }
        Ok(())
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if self.keep_pins {
            info!(pin_dir = %self.pin_dir.display(), "keeping pinned maps");
            return;
        }
        for name in MAP_NAMES {
            let _ = fs::remove_file(self.pin_dir.join(name));
        }
        let _ = fs::remove_file(self.pin_dir.join(gateway_common::GW_LOCAL_STATS));
        // The forward program's links (normally unpinned by the forward path already).
        let links = self.pin_dir.join("links");
        if let Ok(entries) = fs::read_dir(&links) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = fs::remove_dir(&links);
        let _ = fs::remove_dir(&self.pin_dir);
        info!(pin_dir = %self.pin_dir.display(), "removed pinned maps");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_specs_take_the_load_time_sizes() {
        let capacity = Capacity {
            sockets: 8,
            ..Capacity::default()
        };
        let specs = map_specs(capacity, 100);
        for (spec, name) in specs.iter().zip(MAP_NAMES) {
            assert_eq!(spec.name, name);
            let expected = match name {
                GW_SOCKS | GW_PEERS => 8,
                GW_FWD_FLOWS => 100,
                _ => map_specs(Capacity::default(), MAX_FLOWS)
                    .iter()
                    .find(|s| s.name == name)
                    .map_or(0, |s| s.max_entries),
            };
            assert_eq!(spec.max_entries, expected, "{name}");
        }
        let default = map_specs(Capacity::default(), MAX_FLOWS);
        assert_eq!(default[2].max_entries, MAX_SOCKETS);
        assert_eq!(default[3].max_entries, MAX_SOCKETS);
    }
}
