//! The libgwsync.a a C gateway links (`cargo build --release --lib`, as the
//! README says; the OpenWrt SDK sets CARGO_PROFILE_RELEASE_PANIC=unwind for
//! its build too) unwinds on panic, so the panic boundary in ffi.rs turns an
//! internal error into GWSYNC_ERR_PANIC instead of aborting the C program.
//! With `panic = "abort"` catch_unwind never returns: the process dies.
//!
//! The strategy is read from rustc itself for the release staticlib
//! (`--print cfg` shows `panic="..."` for the flags cargo passes), with the
//! abort profile as the control that shows the check can fail.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn cargo() -> Command {
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.current_dir(env!("CARGO_MANIFEST_DIR"));
    cargo
}

/// The panic strategy the release static library is compiled with, with
/// `panic_override` (an environment override of the profile) if given.
fn release_panic_strategy(panic_override: Option<&str>) -> String {
    let mut command = cargo();
    command.args([
        "rustc",
        "--release",
        "--lib",
        "--crate-type",
        "staticlib",
        "--",
        "--print",
        "cfg",
    ]);
    if let Some(strategy) = panic_override {
        command.env("CARGO_PROFILE_RELEASE_PANIC", strategy);
    }
    let output = command.output().expect("run cargo rustc --print cfg");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            line.strip_prefix("panic=")
                .map(|v| v.trim_matches('"').to_owned())
        })
        .expect("rustc prints the panic strategy")
}

#[test]
fn the_release_static_library_unwinds_so_the_ffi_boundary_catches_panics() {
    if !common::runner_argv().is_empty() {
        return common::skip_on_emulator(
            "builds the host release library with cargo; the cross run has its own profile",
        );
    }
    // The artifact the README's command produces.
    let status = cargo()
        .args(["build", "--release", "--lib"])
        .status()
        .expect("run cargo build --release --lib");
    assert!(status.success(), "cargo build --release --lib failed");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    assert!(target_dir.join("release").join("libgwsync.a").is_file());
    assert_eq!(release_panic_strategy(None), "unwind");
    // Control: the check sees an aborting profile.
    assert_eq!(release_panic_strategy(Some("abort")), "abort");
}
