//! Links `kiln` as a position-dependent executable on Linux: a PIE spends several
//! milliseconds of every start applying ~40 000 relocations (and copying the pages
//! they touch), which adds up when many nodes start on one machine at once.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
