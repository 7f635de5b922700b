//! Builds the eBPF programs of `gateway-ebpf` (nightly, bpfel-unknown-none, with BTF)
//! and puts the object in `OUT_DIR`, where `src/ebpf.rs` embeds it.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir).join("../gateway-ebpf");
    // The programs also compile gateway-common: rebuild them when it changes.
    println!("cargo:rerun-if-changed={manifest_dir}/../gateway-common");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "gateway-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
