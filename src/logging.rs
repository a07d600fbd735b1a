//! Where log lines go.
//!
//! - stderr, `gwsync[PID]: level: message`: the daemon run by hand
//!   (`--foreground`) and C programs, which have no Rust logger of their own.
//! - syslog through libc's `syslog(3)` (on OpenWrt: /dev/log, read by logd),
//!   with tag `gwsync[PID]`, facility daemon and each level's own priority:
//!   the daemon under procd (`--syslog`, passed by the init script) or in the
//!   background. Under procd, stderr would reach syslog too, but procd logs
//!   every stderr line at `err` under its own `gwsync[PID]` tag, so severity
//!   filtering in logread and remote syslog would be lost. libc's writer is
//!   the one every OpenWrt C daemon uses (libubox's ulog) and costs no code.

use std::ffi::CString;

/// `gwsync[PID]: level: message`, the shape procd and logread show.
pub struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_ascii_lowercase();
            eprintln!("gwsync[{}]: {level}: {}", std::process::id(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Sends `log` records to stderr at `level` and above. When a logger is
/// already set (an earlier handle, or a Rust host with its own), that one
/// stays and only the level changes.
pub fn log_to_stderr(level: log::LevelFilter) {
    let _ = log::set_logger(&StderrLogger);
    log::set_max_level(level);
}

/// Each record through `syslog(3)` at its level's priority.
pub struct SyslogLogger;

/// The syslog priority of a log level.
pub fn syslog_priority(level: log::Level) -> libc::c_int {
    match level {
        log::Level::Error => libc::LOG_ERR,
        log::Level::Warn => libc::LOG_WARNING,
        log::Level::Info => libc::LOG_INFO,
        log::Level::Debug | log::Level::Trace => libc::LOG_DEBUG,
    }
}

// syslog(3) and openlog(3) are C calls: the only unsafe code here.
#[allow(unsafe_code)]
impl log::Log for SyslogLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // A NUL inside a message would end it early in C: show it instead.
        let text = record.args().to_string().replace('\0', "\\0");
        let Ok(text) = CString::new(text) else {
            return;
        };
        // SAFETY: both strings are NUL-terminated and outlive the call; the
        // message goes through "%s", never as a format.
        unsafe {
            libc::syslog(
                syslog_priority(record.level()),
                c"%s".as_ptr(),
                text.as_ptr(),
            )
        };
    }

    fn flush(&self) {}
}

/// Sends `log` records at `level` and above to syslog, tagged `gwsync[PID]`
/// with facility daemon. Returns false (and changes nothing but the level)
/// when another logger is already set.
#[allow(unsafe_code)]
pub fn log_to_syslog(level: log::LevelFilter) -> bool {
    log::set_max_level(level);
    if log::set_logger(&SyslogLogger).is_err() {
        return false;
    }
    // SAFETY: the ident is a static NUL-terminated string, as openlog keeps
    // the pointer. LOG_NDELAY connects now, before anything can chroot or
    // drop privileges.
    unsafe {
        libc::openlog(
            c"gwsync".as_ptr(),
            libc::LOG_PID | libc::LOG_NDELAY,
            libc::LOG_DAEMON,
        )
    };
    true
}
