//! `cargo xtask image`: the agent's OCI image, built from what is on this machine,
//! without pulling a base image: the `sockgate` binary (a release build made now, or
//! the one `--binary` names), the shell, `mount` and `mountpoint` the `DaemonSet`'s
//! bpffs init container runs, and every shared library `ldd` names for them, in one
//! uncompressed tar layer; with its config, manifest and index as an OCI image layout
//! (`target/image/oci/`) and the same layout as one archive
//! (`target/image/sockgate-VERSION.oci.tar`), which `podman load`, `ctr -n k8s.io
//! images import` and `skopeo copy oci-archive:...` read.
//!
//! Then, unless `--no-run`, the archive is loaded into podman (Debian's `podman` and
//! `runc` are installed when missing) and run: `sockgate --version`, `sockgate check -f`
//! on the examples under `deploy/examples/` (mounted read-only), and the init
//! container's `mountpoint`. How podman is run here, and why, is in [`podman_run`].
//!
//! The layer is reproducible: entries sorted, owned by root, modification time 0.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use sha2::{Digest as _, Sha256};

use crate::{root, run_cmd};

/// The image's name: what `deploy/daemonset.yaml` runs (`imagePullPolicy: Never`).
pub const DEFAULT_NAME: &str = concat!("localhost/sockgate:", env!("CARGO_PKG_VERSION"));

/// Where the agent lives in the image.
const SOCKGATE_PATH: &str = "usr/local/bin/sockgate";

/// The programs of the bpffs init container (`/bin/sh -c "mountpoint -q /sys/fs/bpf ||
/// mount -t bpf bpf /sys/fs/bpf"`), copied from this machine.
const TOOLS: [&str; 3] = ["sh", "mount", "mountpoint"];

/// Top-level directories that are symlinks into `/usr` on a merged-`/usr` system; the
/// image gets the same links, so `/bin/sh` and the ELF interpreter's
/// `/lib64/ld-linux-x86-64.so.2` resolve as they do here.
const MERGED_USR: [&str; 4] = ["bin", "sbin", "lib", "lib64"];

/// Debian packages `podman load` and `podman run` need here.
const PACKAGES: [&str; 2] = ["podman", "runc"];

/// What `cargo xtask image` was asked to do.
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// The `sockgate` binary to put in the image, e.g. the debug build the tests use
    /// (`target/debug/sockgate`); default: `cargo build --release` now.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// The image's name and tag.
    #[arg(long, default_value = DEFAULT_NAME)]
    pub name: String,
    /// Directory for the OCI layout and archive (default: `target/image`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the layout and archive only: no podman.
    #[arg(long)]
    pub no_run: bool,
}

/// One file of the layer.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    /// A regular file copied from `source` (symlinks followed), with its permission
    /// bits (never setuid or setgid: `mount` is setuid root on the host, and needs not
    /// be in an image whose init container runs as root).
    File { source: PathBuf, mode: u32 },
    /// A symbolic link to `target`.
    Link { target: PathBuf },
    /// A directory with `mode`.
    Dir { mode: u32 },
}

/// The layer's contents, by path in the image (relative, no leading `/`).
type Contents = BTreeMap<PathBuf, Entry>;

/// The digests and sizes of a written image layout.
#[derive(Clone, Debug)]
pub struct Built {
    /// The OCI image layout directory.
    pub layout: PathBuf,
    /// The same layout as one tar archive.
    pub archive: PathBuf,
    /// `sha256:...` of the manifest.
    pub manifest_digest: String,
    /// Bytes of the (uncompressed) layer.
    pub layer_size: u64,
}

/// `cargo xtask image`.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => release_binary()?,
    };
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("image"));
    let contents = contents(&binary)?;
    let built = write_layout(&contents, &opts.name, &out)?;
    println!(
        "image: {} ({} files, layer {} MB, manifest {})\n  layout  {}\n  archive {}",
        opts.name,
        contents
            .values()
            .filter(|e| matches!(e, Entry::File { .. }))
            .count(),
        built.layer_size.div_ceil(1_000_000),
        built.manifest_digest,
        built.layout.display(),
        built.archive.display(),
    );
    if opts.no_run {
        return Ok(());
    }
    install_podman()?;
    load(&built.archive, &opts.name)?;
    try_image(&opts.name)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// `cargo build --release` of the agent; its path.
fn release_binary() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("image: building the release agent");
    run_cmd(Command::new(cargo).current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "gateway-userspace",
        "--bin",
        "sockgate",
    ]))?;
    Ok(target_dir().join("release/sockgate"))
}

/// Where `name` is found on `PATH`.
fn which(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found on PATH"))
}

/// The shared libraries of `elf` as `ldd` names them (the ELF interpreter included,
/// the vDSO left out); none for a static binary.
fn libraries(elf: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .context("running ldd (Debian's libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: "not a dynamic executable" (status 1).
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {err}", elf.display());
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", elf.display()))
}

/// The library paths of `ldd` output.
fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        ensure!(!line.contains("not found"), "missing library: {line}");
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no path.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Where file `host` (a path as the dynamic loader names it) goes in the image: its
/// directory resolved (`/lib/x86_64-linux-gnu` -> `usr/lib/x86_64-linux-gnu` on a
/// merged-`/usr` system), its own name kept (the soname, not the file it links to).
fn image_path(host: &Path) -> anyhow::Result<PathBuf> {
    let dir = host
        .parent()
        .with_context(|| format!("{} has no directory", host.display()))?;
    let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let name = host
        .file_name()
        .with_context(|| format!("{} has no file name", host.display()))?;
    Ok(dir.strip_prefix("/").unwrap_or(&dir).join(name))
}

/// Adds `path`'s parent directories.
fn add_dirs(c: &mut Contents, path: &Path) {
    for dir in path.ancestors().skip(1) {
        if !dir.as_os_str().is_empty() {
            c.entry(dir.to_path_buf())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
    }
}

fn add_file(c: &mut Contents, path: PathBuf, source: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(source).with_context(|| format!("{}", source.display()))?;
    add_dirs(c, &path);
    c.insert(
        path,
        Entry::File {
            source: source.to_path_buf(),
            mode: meta.permissions().mode() & 0o777,
        },
    );
    Ok(())
}

/// Everything the layer holds for `binary`.
fn contents(binary: &Path) -> anyhow::Result<Contents> {
    ensure!(
        binary.is_file(),
        "{} not found (build it first, or leave out --binary)",
        binary.display()
    );
    let mut c = Contents::new();
    let mut elves = vec![binary.to_path_buf()];
    add_file(&mut c, SOCKGATE_PATH.into(), binary)?;
    for tool in TOOLS {
        let host = which(tool)?;
        add_file(&mut c, image_path(&host)?, &host)?;
        elves.push(host);
    }
    for elf in &elves {
        for lib in libraries(elf)? {
            add_file(&mut c, image_path(&lib)?, &lib)?;
        }
    }
    for top in MERGED_USR {
        // Only links to a directory the image has (no `sbin` without `usr/sbin`).
        if let Ok(target) = std::fs::read_link(Path::new("/").join(top))
            && c.contains_key(&target)
        {
            c.insert(top.into(), Entry::Link { target });
        }
    }
    // Scratch space for whoever needs it; the agent's container mounts its root
    // read-only.
    c.insert("tmp".into(), Entry::Dir { mode: 0o1777 });
    Ok(c)
}

/// The layer: a tar of `c`, reproducible (sorted, root-owned, time 0).
fn layer(c: &Contents, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    for (path, entry) in c {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match entry {
            Entry::Dir { mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                tar.append_data(&mut h, path, std::io::empty())?;
            }
            Entry::Link { target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                tar.append_link(&mut h, path, target)?;
            }
            Entry::File { source, mode } => {
                let f =
                    std::fs::File::open(source).with_context(|| format!("{}", source.display()))?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(f.metadata()?.len());
                tar.append_data(&mut h, path, f)?;
            }
        }
    }
    tar.into_inner()?.flush()?;
    Ok(())
}

/// Writes `bytes` as a blob of `layout`; its `sha256:` digest.
fn blob(layout: &Path, bytes: &[u8]) -> anyhow::Result<String> {
    let hex = hex(&Sha256::digest(bytes));
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes)?;
    Ok(format!("sha256:{hex}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The OCI architecture name of this machine's.
fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes the OCI image layout of `c` named `name` under `out` (`out/oci/` and
/// `out/sockgate-VERSION.oci.tar`).
fn write_layout(c: &Contents, name: &str, out: &Path) -> anyhow::Result<Built> {
    let layout = out.join("oci");
    if layout.exists() {
        std::fs::remove_dir_all(&layout)?;
    }
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;

    // The layer, hashed while written.
    let tmp = layout.join("layer.tar.tmp");
    let mut hashing = HashingWriter {
        inner: std::io::BufWriter::new(std::fs::File::create(&tmp)?),
        hash: Sha256::new(),
        size: 0,
    };
    layer(c, &mut hashing)?;
    hashing.inner.flush()?;
    let layer_size = hashing.size;
    let layer_digest = format!("sha256:{}", hex(&hashing.hash.finalize()));
    std::fs::rename(
        &tmp,
        layout
            .join("blobs/sha256")
            .join(layer_digest.trim_start_matches("sha256:")),
    )?;

    let version = env!("CARGO_PKG_VERSION");
    let config = serde_json::json!({
        "architecture": architecture(),
        "os": "linux",
        "config": {
            "Entrypoint": [format!("/{SOCKGATE_PATH}")],
            "Cmd": ["run", "--source=kube"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "Labels": {
                "org.opencontainers.image.title": "sockgate",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.description": "Gateway API TCPRoute with an eBPF data path: the node agent",
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        "history": [{ "created_by": "cargo xtask image" }],
    });
    let config = serde_json::to_vec(&config)?;
    let config_digest = blob(&layout, &config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_size,
        }],
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_digest = blob(&layout, &manifest)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": name },
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;

    let archive = out.join(format!("sockgate-{version}.oci.tar"));
    let mut tar = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(&archive)?));
    tar.mode(tar::HeaderMode::Deterministic);
    tar.append_dir_all(".", &layout)?;
    tar.into_inner()?.flush()?;
    Ok(Built {
        layout,
        archive,
        manifest_digest,
        layer_size,
    })
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs Debian's `podman` and `runc` when missing.
fn install_podman() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("image: installing Debian packages: {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update (the image needs root for podman)")?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// `podman load` of the archive; checks that it is loaded under `name`.
fn load(archive: &Path, name: &str) -> anyhow::Result<()> {
    let out = Command::new("podman")
        .arg("load")
        .arg("-i")
        .arg(archive)
        .output()
        .context("running podman load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "podman load -i {} failed: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        text.lines()
            .any(|l| l.trim() == format!("Loaded image: {name}")
                || l.trim() == format!("Loaded image(s): {name}")),
        "podman load did not name {name}: {text}"
    );
    println!("image: loaded into podman as {name}");
    Ok(())
}

/// `podman run` of `name` with `args`, the way it works on this kind of machine:
///
/// * `--pull=never`: the image is local; nothing is fetched.
/// * `--network=none`: the commands run need no network, and none is set up.
/// * `--runtime=runc`: crun (podman's default on Debian) refuses to start any
///   container on a hybrid cgroup host whose cgroup v2 hierarchy has a controller
///   enabled ("cgroups in hybrid mode not supported, drop all controllers from
///   cgroupv2"); this machine has v1 controllers and `hugetlb` on the unified
///   hierarchy. runc starts them.
/// * `--ulimit nofile=...,nproc=...`: podman asks the runtime for its own default
///   limits (above this machine's hard `RLIMIT_NOFILE` of 20000), and raising a hard
///   limit needs `CAP_SYS_RESOURCE`, which this sandbox's bounding set lacks:
///   `setrlimit` fails with EPERM and the container does not start. The limits given
///   are this process's own open-file limits and 4096 processes (root is not held to
///   `RLIMIT_NPROC` anyway), all at or below what conmon has.
///
/// Returns stdout; fails with stderr when the container fails.
pub fn podman_run(name: &str, extra: &[&str], args: &[&str]) -> anyhow::Result<String> {
    use nix::sys::resource::{Resource, getrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    let out = Command::new("podman")
        .args([
            "run",
            "--rm",
            "--pull=never",
            "--network=none",
            "--runtime=runc",
        ])
        .arg(format!("--ulimit=nofile={soft}:{hard}"))
        .arg("--ulimit=nproc=4096:4096")
        .args(extra)
        .arg(name)
        .args(args)
        .output()
        .context("running podman run")?;
    ensure!(
        out.status.success(),
        "podman run {name} {}: {} {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the image: `--version`, `check -f` on the examples, and the init container's
/// `mountpoint`.
fn try_image(name: &str) -> anyhow::Result<()> {
    let version = podman_run(name, &[], &["--version"])?;
    let want = format!("sockgate {}", env!("CARGO_PKG_VERSION"));
    ensure!(
        version.trim() == want,
        "--version said {version:?}, not {want:?}"
    );
    println!("image: podman run {name} --version: {}", version.trim());

    let examples = root().join("deploy/examples");
    let volume = format!("--volume={}:/examples:ro", examples.display());
    let report = podman_run(
        name,
        &[&volume],
        &["check", "-f", "/examples/gateway-api-basic"],
    )?;
    ensure!(
        report.contains("programmed:") && report.contains("port: 8080"),
        "check -f /examples/gateway-api-basic printed no programmed listener 8080:\n{report}"
    );
    println!(
        "image: podman run {name} check -f /examples/gateway-api-basic: {} lines, listener 8080 programmed",
        report.lines().count()
    );

    let init = podman_run(
        name,
        &["--entrypoint=/bin/sh"],
        &["-c", "mountpoint / && command -v mount"],
    )?;
    ensure!(
        init.contains("/ is a mountpoint") && init.contains("/mount"),
        "the init container's tools: {init:?}"
    );
    println!("image: the bpffs init container's sh, mountpoint and mount run");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text).expect("parses"),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(
            parse_ldd("\tstatically linked\n")
                .expect("static")
                .is_empty()
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn the_daemon_set_runs_this_image_without_pulling_it() {
        let text =
            std::fs::read_to_string(root().join("deploy/daemonset.yaml")).expect("daemonset");
        let images: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("image:"))
            .collect();
        assert_eq!(images.len(), 2, "init container and agent: {images:?}");
        for i in &images {
            assert_eq!(*i, format!("image: {DEFAULT_NAME}"));
        }
        let never = text
            .lines()
            .filter(|l| l.trim() == "imagePullPolicy: Never")
            .count();
        assert_eq!(never, images.len());
        // The init container's command uses the tools the image holds.
        for tool in ["/bin/sh", "mountpoint", "mount -t bpf"] {
            assert!(text.contains(tool), "{tool}");
        }
    }

    /// The layout of an image of `/bin/true` (standing in for the agent): every blob
    /// under its digest with its size, the config's `diff_ids` naming the layer, the
    /// index naming the image, and the layer holding the agent, the init container's
    /// tools and their libraries.
    #[test]
    fn layout_blobs_match_their_digests_and_the_layer_holds_the_libraries() {
        let out = std::env::temp_dir().join(format!("sockgate-image-test-{}", std::process::id()));
        let truth = which("true").expect("true on PATH");
        let c = contents(&truth).expect("contents");
        let built = write_layout(&c, "localhost/sockgate:test", &out).expect("layout");
        let read_json = |p: &Path| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(p).expect("read")).expect("json")
        };
        let blob_path = |digest: &str| {
            built
                .layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:"))
        };
        let check_blob = |d: &serde_json::Value| {
            let digest = d["digest"].as_str().expect("digest");
            let bytes = std::fs::read(blob_path(digest)).expect("blob");
            assert_eq!(format!("sha256:{}", hex(&Sha256::digest(&bytes))), digest);
            assert_eq!(Some(bytes.len() as u64), d["size"].as_u64());
        };
        let index = read_json(&built.layout.join("index.json"));
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["org.opencontainers.image.ref.name"],
            "localhost/sockgate:test"
        );
        check_blob(m);
        assert_eq!(m["digest"], built.manifest_digest.as_str());
        let manifest = read_json(&blob_path(m["digest"].as_str().expect("digest")));
        check_blob(&manifest["config"]);
        check_blob(&manifest["layers"][0]);
        let config = read_json(&blob_path(
            manifest["config"]["digest"].as_str().expect("d"),
        ));
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/sockgate");

        let layer = std::fs::File::open(blob_path(
            manifest["layers"][0]["digest"].as_str().expect("digest"),
        ))
        .expect("layer");
        let mut names = BTreeMap::new();
        for e in tar::Archive::new(layer).entries().expect("entries") {
            let e = e.expect("entry");
            let h = e.header();
            assert_eq!((h.uid().ok(), h.mtime().ok()), (Some(0), Some(0)));
            let mode = h.mode().expect("mode");
            assert_eq!(mode & 0o6000, 0, "no setuid or setgid: {:?}", e.path());
            names.insert(
                e.path().expect("path").to_string_lossy().into_owned(),
                h.entry_type(),
            );
        }
        assert_eq!(
            names.get("usr/local/bin/sockgate"),
            Some(&tar::EntryType::Regular)
        );
        for lib in libraries(&truth)
            .expect("ldd")
            .iter()
            .chain(&libraries(&which("mount").expect("mount")).expect("ldd"))
        {
            let p = image_path(lib).expect("path");
            assert!(
                names.contains_key(p.to_str().expect("utf-8")),
                "{p:?} in {names:?}"
            );
        }
        assert!(
            names.keys().any(|n| n.ends_with("bin/mountpoint")),
            "{names:?}"
        );
        // The same input gives the same image.
        let again =
            write_layout(&c, "localhost/sockgate:test", &out.join("again")).expect("layout");
        assert_eq!(again.manifest_digest, built.manifest_digest);
        let _ = std::fs::remove_dir_all(&out);
    }
}
