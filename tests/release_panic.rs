//! The libgwsync.a a C gateway links (`cargo build --release --lib`, as the
//! README says; the OpenWrt SDK sets CARGO_PROFILE_RELEASE_PANIC=unwind for
//! its build too) unwinds on panic, so the panic boundary in ffi.rs turns an
//! internal error into GWSYNC_ERR_PANIC instead of aborting the C program.
//! With `panic = "abort"` the archive carries the panic_abort runtime and
//! catch_unwind never returns.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// Names defined (`T`) in the archive.
fn defined_symbols(archive: &PathBuf) -> Vec<String> {
    let output = Command::new("nm")
        .args(["--defined-only", "-A"])
        .arg(archive)
        .output()
        .expect("run nm");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.rsplit(' ').next().map(str::to_owned))
        .collect()
}

#[test]
fn the_release_static_library_unwinds_so_the_ffi_boundary_catches_panics() {
    if !common::runner_argv().is_empty() {
        return common::skip_on_emulator(
            "builds the host release library with cargo; the cross run has its own",
        );
    }
    if Command::new("nm").arg("--version").output().is_err() {
        return common::skip("nm (binutils) is not installed");
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // The target directory cargo uses for `cargo build --release`: shared
    // with any release build already done, so only the library is linked.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("target"));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--lib"])
        .current_dir(&manifest)
        .status()
        .expect("run cargo build --release --lib");
    assert!(status.success(), "cargo build --release --lib failed");
    let archive = target_dir.join("release").join("libgwsync.a");
    let symbols = defined_symbols(&archive);
    assert!(
        symbols.iter().any(|name| name == "__rust_start_panic"),
        "no panic runtime found in {}: is nm reading the archive?",
        archive.display()
    );
    assert!(
        symbols.iter().any(|name| name == "__rust_panic_cleanup"),
        "{} has no unwinding panic runtime (panic = \"abort\"?): a panic would abort the C host",
        archive.display()
    );
}
