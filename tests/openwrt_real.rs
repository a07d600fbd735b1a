//! The package on OpenWrt 24.10's own userland: procd as PID 1, ubusd, logd,
//! netifd, uci, rc.common and hotplug-call built from their upstream sources
//! (tests/common/owrt.rs). Needs root; skips under the cross emulator.

mod common;

use common::owrt::{Flavor, Net, Router};
use std::time::Duration;

/// A router with the package installed in its image and booted, with lan up.
fn booted(test: &str) -> Option<Router> {
    let mut router = Router::new(test, Flavor::Base)?;
    router.install_package();
    router.enable_installed();
    router.boot(Net::Alone);
    router.wait_lan_up();
    Some(router)
}

/// The daemon's pid as procd reports it, once it runs.
fn daemon_pid(router: &Router) -> u32 {
    router.wait_for(
        "procd runs the gwsync instance",
        Duration::from_secs(20),
        "ubus call service list '{\"name\":\"gwsync\"}' | jsonfilter -e '@.gwsync.instances.*.running' | grep -qx true",
    );
    router
        .sh_ok("ubus call service list '{\"name\":\"gwsync\"}' | jsonfilter -e '@.gwsync.instances.*.pid'")
        .trim()
        .parse()
        .expect("pid")
}

#[test]
fn boot_starts_the_enabled_service() {
    let Some(router) = booted("boot_starts_the_enabled_service") else {
        return;
    };
    assert!(router.path("/etc/rc.d/S95gwsync").exists(), "not enabled");
    let pid = daemon_pid(&router);
    assert!(pid > 1);
    router.wait_for(
        "the daemon answers on its socket",
        Duration::from_secs(10),
        "gwsync --socket /var/run/gwsync.sock status",
    );
}
