//! Compiles Ferry's eBPF programs (C, clang -target bpf) into OUT_DIR; this crate
//! embeds the object. `-g` is required: aya needs BTF for the `.maps` section.
use std::{env, path::PathBuf, process::Command};

const SOURCES: &[&str] = &["ferry.bpf.c", "include/ferry.h"];

fn main() {
    let ebpf = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    for s in SOURCES {
        println!("cargo:rerun-if-changed={}", ebpf.join(s).display());
    }
    println!("cargo:rerun-if-env-changed=FERRY_CLANG");
    let clang = env::var("FERRY_CLANG").unwrap_or_else(|_| "clang".into());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("ferry.bpf.o");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg(format!("-I{}", ebpf.join("include").display()))
        .arg("-c")
        .arg(ebpf.join("ferry.bpf.c"))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{clang}` to build the eBPF programs ({e}). \
                 Install clang, llvm and libbpf-dev (`cargo xtask deps` does it as root)."
            )
        });
    assert!(status.success(), "clang failed to compile ebpf/ferry.bpf.c");
}
