//! Build steps for hicra-core:
//! - an rpath to libtorch, so `target/release/hicra` runs without LD_LIBRARY_PATH. It is a
//!   RUNPATH (new dtags), so LD_LIBRARY_PATH still overrides it on a GPU machine whose libtorch
//!   lives elsewhere;
//! - the C++ shim to PyTorch's c10d collectives (`cpp/c10d_shim.cpp`), compiled against the
//!   same libtorch headers tch's own wrapper uses. Its symbols resolve in `libtorch_cpu`, which
//!   torch-sys links.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=cpp/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=cpp/gloo-include");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        panic!("LIBTORCH is not set: run scripts/setup.sh (it installs libtorch into .deps/, which .cargo/config.toml names)");
    };
    let libtorch = absolute(Path::new(&libtorch));
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");

    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .file("cpp/c10d_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include("cpp/gloo-include")
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        // ProcessGroupGloo.hpp is empty without it.
        .define("USE_C10D_GLOO", None)
        .warnings(false)
        .compile("hicra_c10d_shim");
}

/// `LIBTORCH` as .cargo/config.toml sets it is relative to the workspace; cargo resolves
/// `relative = true` for us, but a user's own LIBTORCH may be relative to the crate.
fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|dir| dir.join(path)).unwrap_or_else(|_| path.to_path_buf())
    }
}
