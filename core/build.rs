//! Embeds an rpath to libtorch so `target/release/hicra` runs without LD_LIBRARY_PATH.
//! It is a RUNPATH (new dtags), so LD_LIBRARY_PATH still overrides it on a GPU machine whose
//! libtorch lives elsewhere.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
    }
}
