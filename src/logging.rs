//! Plain log lines on stderr, for the daemon in the foreground (procd also
//! captures stderr into syslog) and for C programs, which have no Rust
//! logger of their own. The daemon in the background logs to syslog instead.

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
