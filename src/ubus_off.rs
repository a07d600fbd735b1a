//! The ubus side when gwsync is built without the `ubus` feature: no
//! object is published. The API is that of the real module (src/ubus.rs),
//! so the daemon loop and `--ubus-socket` are the same in both builds.

use std::os::fd::BorrowedFd;
use std::path::Path;

use crate::driver::{ChangeEvent, Driver};

/// Where ubusd listens on OpenWrt (the flag's default in both builds).
pub const SOCKET_DEFAULT: &str = "/var/run/ubus/ubus.sock";

/// Does nothing: this build has no ubus support.
#[derive(Debug)]
pub struct Ubus;

impl Ubus {
    pub fn new(path: &Path) -> Ubus {
        log::debug!(
            "built without ubus support: not publishing on {}",
            path.display()
        );
        Ubus
    }

    pub fn connects(&self) -> u64 {
        0
    }

    pub fn poll_fd(&self) -> Option<(BorrowedFd<'_>, bool)> {
        None
    }

    pub fn timeout_ms(&self) -> Option<u64> {
        None
    }

    pub fn process(&mut self, _driver: &mut Driver, _readable: bool) {}

    pub fn broadcast(&mut self, _change: &ChangeEvent) {}
}
