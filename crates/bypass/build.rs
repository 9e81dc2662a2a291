//! Compiles the BPF programs in `bpf/` with clang (`-target bpf`) into `$OUT_DIR`, where
//! `src/lib.rs` includes the object. clang is Debian's `clang` package, which `scripts/setup`
//! installs (BoringSSL's build needs it too).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src = "bpf/bypass.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // The kernel UAPI headers include <asm/types.h>, which Debian keeps under the multiarch
    // directory of the host.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let obj = out.join("bypass.o");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .args(["-c", src, "-o"])
        .arg(&obj)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile {src} ({s}); see its messages above"),
        Err(e) => panic!(
            "cannot run {clang} to compile the BPF programs in {src}: {e}. Install Debian's \
             `clang` (bash scripts/setup does), or set CLANG to a clang that targets BPF"
        ),
    }
}
