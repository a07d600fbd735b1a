//! The one validated configuration of a gateway, whichever way it comes:
//! the daemon's flags, the JSON of `gwsync_open`, or (for the key file) a
//! `reload` on the control socket. Every check lives here, so the three
//! agree on what is valid and on what each error says.
//!
//! | daemon flag              | C config key             | default                |
//! |--------------------------|--------------------------|------------------------|
//! | `--interface IF` (repeat)| `"interfaces": [..]`     | the kernel's choice    |
//! | `--group ADDR`           | `"group"`                | 239.255.73.73          |
//! | `--port N`               | `"port"`                 | 7373                   |
//! | `--state-dir DIR`        | `"state_dir"`            | daemon: see below; C: memory only |
//! | `--socket PATH`          | (daemon only)            | see below              |
//! | `--ubus-socket PATH`     | (daemon only)            | /var/run/ubus/ubus.sock; `""`: no ubus |
//! | `--key-file FILE`        | `"key_file"`             | none                   |
//! | (key file only)          | `"keys": ["hex", ..]`    | none                   |
//! | `--open`                 | `"open": true`           | false: a key is needed |
//! | `--node-id HEX`          | `"node_id"`              | persisted, or random   |
//! | `--log-level LEVEL`      | `"log_level"`            | daemon info, C warn    |
//! | `--syslog`               | (daemon only)            | foreground: stderr     |
//! | `--max-entries N`        | `"max_entries"`          | 100000 entries         |
//! | `--max-store-bytes N`    | `"max_store_bytes"`      | 16777216 bytes         |
//! | `--tombstone-lifetime-s N`| `"tombstone_lifetime_s"`| 604800 s (7 days)      |
//!
//! A gateway without a key refuses to start unless open mode is asked for:
//! with no key every host on the LAN can read and rewrite every value.
//!
//! Default paths: root uses `/var/run/gwsync.sock` and `/etc/gwsync` (what
//! the init script passes too). Other users get `$XDG_RUNTIME_DIR/gwsync.sock`
//! and `$XDG_STATE_HOME/gwsync` (or `~/.local/state/gwsync`); without
//! those, a private directory `/tmp/gwsync-<uid>` that is created mode 0700
//! and checked (owned by the user, not a symlink, no access for others), so
//! no other user can put a socket where the CLI will look.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::crypto::{self, GroupKey, KeyFileError};
use crate::driver::DriverConfig;
use crate::engine::NodeId;
use crate::net;

/// Longest interface name Linux allows (IFNAMSIZ less the NUL).
pub const INTERFACE_NAME_BYTES_MAX: usize = 15;
/// Bounds of `--max-entries`: at least one entry, and few enough that the
/// store's index fits a router's RAM.
pub const MAX_ENTRIES_RANGE: (u64, u64) = (1, 10_000_000);
/// Bounds of `--max-store-bytes`: room for one largest value, up to 1 GiB.
pub const MAX_STORE_BYTES_RANGE: (u64, u64) = (65_536 + 256, 1 << 30);
/// Bounds of `--tombstone-lifetime-s`: a delete must outlive a gateway's
/// usual time apart (a minute at the very least, ten years at most).
pub const TOMBSTONE_LIFETIME_S_RANGE: (u64, u64) = (60, 10 * 365 * 24 * 3600);

/// How a configuration error is reported: a bad value (usage error, rc 2,
/// `GWSYNC_ERR_INVALID`) or a file the system would not give us (rc 1,
/// `GWSYNC_ERR_IO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigErrorKind {
    Invalid,
    Io,
}

/// A configuration that cannot be used, and what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub kind: ConfigErrorKind,
    pub message: String,
}

impl ConfigError {
    fn invalid(message: impl Into<String>) -> ConfigError {
        ConfigError {
            kind: ConfigErrorKind::Invalid,
            message: message.into(),
        }
    }

    fn io(message: impl Into<String>) -> ConfigError {
        ConfigError {
            kind: ConfigErrorKind::Io,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where a configuration came from: it decides defaults and how an error
/// names the setting (`--max-entries` or `"max_entries"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    DaemonFlags,
    CJson,
}

impl Source {
    fn name(self, flag: &str) -> String {
        match self {
            Source::DaemonFlags => format!("--{}", flag.replace('_', "-")),
            Source::CJson => format!("\"{flag}\""),
        }
    }
}

/// One gateway's settings, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub source: Source,
    pub interfaces: Vec<String>,
    pub group: IpAddr,
    pub port: u16,
    pub state_dir: Option<PathBuf>,
    /// The control socket (daemon only).
    pub socket: Option<PathBuf>,
    /// ubusd's socket (daemon only; empty: no ubus object), see [`crate::ubus`].
    pub ubus_socket: PathBuf,
    pub key_file: Option<PathBuf>,
    /// Keys given inline (C config `"keys"`), first one sends.
    pub keys: Vec<GroupKey>,
    pub open: bool,
    pub node_id: Option<NodeId>,
    pub log_level: log::LevelFilter,
    pub foreground: bool,
    /// Log to syslog even in the foreground (the OpenWrt init script: procd
    /// would log stderr at `err`).
    pub syslog: bool,
    pub max_entries: u64,
    pub max_store_bytes: u64,
    pub tombstone_lifetime_s: u64,
}

impl Config {
    /// The defaults of `source` (no key, not open: not startable as is).
    pub fn new(source: Source) -> Config {
        let store = crate::engine::store::StoreLimits::default();
        Config {
            source,
            interfaces: Vec::new(),
            group: IpAddr::V4(net::GROUP_V4_DEFAULT),
            port: net::PORT_DEFAULT,
            state_dir: None,
            socket: None,
            ubus_socket: PathBuf::from(crate::ubus::SOCKET_DEFAULT),
            key_file: None,
            keys: Vec::new(),
            open: false,
            node_id: None,
            log_level: match source {
                Source::DaemonFlags => log::LevelFilter::Info,
                Source::CJson => log::LevelFilter::Warn,
            },
            foreground: false,
            syslog: false,
            max_entries: store.entries_max as u64,
            max_store_bytes: store.store_bytes_max as u64,
            tombstone_lifetime_s: store.tombstone_ttl_ms / 1000,
        }
    }

    /// Parses `gwsync daemon`'s flags (everything after `daemon`; a
    /// `--socket` given before the subcommand is passed as `socket`).
    /// Unset paths get the defaults of the user running it.
    pub fn from_daemon_args(
        args: impl IntoIterator<Item = String>,
        socket: Option<PathBuf>,
    ) -> Result<Config, ConfigError> {
        let mut config = Config::new(Source::DaemonFlags);
        config.socket = socket;
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .ok_or_else(|| ConfigError::invalid(format!("{flag} needs a value")))
            };
            match flag.as_str() {
                "--interface" | "-i" => {
                    let name = value()?;
                    config.interfaces.push(config.interface(&name)?);
                }
                "--group" => config.group = config.group(&value()?)?,
                "--port" => config.port = config.port(&value()?)?,
                "--state-dir" => config.state_dir = Some(PathBuf::from(value()?)),
                "--socket" => config.socket = Some(PathBuf::from(value()?)),
                "--ubus-socket" => config.ubus_socket = PathBuf::from(value()?),
                "--key-file" => config.key_file = Some(PathBuf::from(value()?)),
                "--open" => config.open = true,
                "--node-id" => config.node_id = Some(config.node_id(&value()?)?),
                "--log-level" => config.log_level = config.log_level(&value()?)?,
                "--foreground" | "-f" => config.foreground = true,
                "--syslog" => config.syslog = true,
                "--max-entries" => {
                    config.max_entries =
                        config.number("max_entries", &value()?, MAX_ENTRIES_RANGE, "entries")?
                }
                "--max-store-bytes" => {
                    config.max_store_bytes = config.number(
                        "max_store_bytes",
                        &value()?,
                        MAX_STORE_BYTES_RANGE,
                        "bytes",
                    )?
                }
                "--tombstone-lifetime-s" => {
                    config.tombstone_lifetime_s = config.number(
                        "tombstone_lifetime_s",
                        &value()?,
                        TOMBSTONE_LIFETIME_S_RANGE,
                        "seconds",
                    )?
                }
                other => {
                    return Err(ConfigError::invalid(format!(
                        "daemon: unknown option: {other}"
                    )));
                }
            }
        }
        if config.open && config.key_file.is_some() {
            return Err(ConfigError::invalid(
                "--open and --key-file exclude each other: give one",
            ));
        }
        if config.socket.is_none() {
            config.socket = Some(default_socket(true)?);
        }
        if config.state_dir.is_none() {
            config.state_dir = Some(default_state_dir()?);
        }
        Ok(config)
    }

    /// Parses the JSON of `gwsync_open`: an object whose keys mirror the
    /// daemon's flags; every key is optional, unknown or repeated keys are
    /// errors.
    pub fn from_json(json: &str) -> Result<Config, ConfigError> {
        let raw: JsonConfig = serde_json::from_str(json)
            .map_err(|error| ConfigError::invalid(format!("config: {error}")))?;
        let mut config = Config::new(Source::CJson);
        let context = |error: ConfigError| ConfigError {
            kind: error.kind,
            message: format!("config: {}", error.message),
        };
        for name in raw.interfaces.unwrap_or_default() {
            let name = config.interface(&name).map_err(context)?;
            config.interfaces.push(name);
        }
        if let Some(group) = raw.group {
            config.group = config.group(&group).map_err(context)?;
        }
        if let Some(port) = raw.port {
            config.port = config.port(&port.to_string()).map_err(context)?;
        }
        config.state_dir = raw.state_dir.map(PathBuf::from);
        config.key_file = raw.key_file.map(PathBuf::from);
        if let Some(keys) = raw.keys {
            if keys.is_empty() || keys.len() > crypto::KEYRING_KEYS_MAX {
                return Err(context(ConfigError::invalid(format!(
                    "\"keys\" holds {} keys; give 1 or {} (the key to send with first)",
                    keys.len(),
                    crypto::KEYRING_KEYS_MAX
                ))));
            }
            for (index, text) in keys.iter().enumerate() {
                let key = text.parse::<GroupKey>().map_err(|error| {
                    context(ConfigError::invalid(format!("\"keys\"[{index}]: {error}")))
                })?;
                config.keys.push(key);
            }
        }
        config.open = raw.open.unwrap_or(false);
        if let Some(id) = raw.node_id {
            config.node_id = Some(config.node_id(&id).map_err(context)?);
        }
        if let Some(level) = raw.log_level {
            config.log_level = config.log_level(&level).map_err(context)?;
        }
        if let Some(n) = raw.max_entries {
            config.max_entries = config
                .number("max_entries", &n.to_string(), MAX_ENTRIES_RANGE, "entries")
                .map_err(context)?;
        }
        if let Some(n) = raw.max_store_bytes {
            config.max_store_bytes = config
                .number(
                    "max_store_bytes",
                    &n.to_string(),
                    MAX_STORE_BYTES_RANGE,
                    "bytes",
                )
                .map_err(context)?;
        }
        if let Some(n) = raw.tombstone_lifetime_s {
            config.tombstone_lifetime_s = config
                .number(
                    "tombstone_lifetime_s",
                    &n.to_string(),
                    TOMBSTONE_LIFETIME_S_RANGE,
                    "seconds",
                )
                .map_err(context)?;
        }
        let key_sources = usize::from(config.key_file.is_some())
            + usize::from(!config.keys.is_empty())
            + usize::from(config.open);
        if key_sources > 1 {
            return Err(context(ConfigError::invalid(
                "give one of \"key_file\", \"keys\" and \"open\": true",
            )));
        }
        Ok(config)
    }

    fn interface(&self, name: &str) -> Result<String, ConfigError> {
        let valid = !name.is_empty()
            && name.len() <= INTERFACE_NAME_BYTES_MAX
            && !name.contains(['/', ':'])
            && !name.chars().any(|c| c.is_whitespace() || c.is_control());
        if valid {
            Ok(name.to_owned())
        } else {
            Err(ConfigError::invalid(format!(
                "{}: not an interface name (1 to {INTERFACE_NAME_BYTES_MAX} bytes, no '/', ':' or spaces): {name:?}",
                self.source.name("interface")
            )))
        }
    }

    fn group(&self, text: &str) -> Result<IpAddr, ConfigError> {
        let name = self.source.name("group");
        let group: IpAddr = text
            .parse()
            .map_err(|_| ConfigError::invalid(format!("{name}: not an IP address: {text}")))?;
        if !group.is_multicast() {
            return Err(ConfigError::invalid(format!(
                "{name}: not a multicast address: {text}"
            )));
        }
        Ok(group)
    }

    fn port(&self, text: &str) -> Result<u16, ConfigError> {
        text.parse().ok().filter(|&port| port != 0).ok_or_else(|| {
            ConfigError::invalid(format!(
                "{}: not a port number (1 to 65535): {text}",
                self.source.name("port")
            ))
        })
    }

    fn node_id(&self, text: &str) -> Result<NodeId, ConfigError> {
        let valid = (1..=16).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit());
        valid
            .then(|| text.parse::<NodeId>().ok())
            .flatten()
            .ok_or_else(|| {
                ConfigError::invalid(format!(
                    "{}: expected 1 to 16 hex digits: {text}",
                    self.source.name("node_id")
                ))
            })
    }

    fn log_level(&self, text: &str) -> Result<log::LevelFilter, ConfigError> {
        text.parse().map_err(|_| {
            ConfigError::invalid(format!(
                "{}: unknown level (off, error, warn, info, debug, trace): {text}",
                self.source.name("log_level")
            ))
        })
    }

    fn number(
        &self,
        flag: &str,
        text: &str,
        (min, max): (u64, u64),
        unit: &str,
    ) -> Result<u64, ConfigError> {
        text.parse::<u64>()
            .ok()
            .filter(|n| (min..=max).contains(n) && usize::try_from(*n).is_ok())
            .ok_or_else(|| {
                ConfigError::invalid(format!(
                    "{}: expected {min} to {max} {unit}: {text}",
                    self.source.name(flag)
                ))
            })
    }

    /// How to get a key, in the words of this source.
    fn how_to_key(&self) -> String {
        match self.source {
            Source::DaemonFlags => {
                "give --key-file FILE with the group's key (create it once with \
                 `umask 077; gwsync genkey > /etc/gwsync.key` and copy the same file to every \
                 gateway), or --open to run without authentication and encryption"
                    .to_owned()
            }
            Source::CJson => "set \"key_file\" (a file made by `gwsync genkey`, the same on every \
                 gateway) or \"keys\", or \"open\": true to run without authentication and \
                 encryption"
                .to_owned(),
        }
    }

    /// The keys to use now: the key file read again, or the inline keys.
    /// Empty only in open mode.
    pub fn load_keys(&self) -> Result<Vec<GroupKey>, ConfigError> {
        if let Some(path) = &self.key_file {
            return load_key_file(path);
        }
        if self.keys.is_empty() && !self.open {
            return Err(ConfigError::invalid(format!(
                "no group key: anyone on the LAN could read and change every value; {}",
                self.how_to_key()
            )));
        }
        Ok(self.keys.clone())
    }

    /// The driver's configuration, with the keys loaded.
    pub fn driver_config(&self) -> Result<DriverConfig, ConfigError> {
        let mut driver = DriverConfig {
            interfaces: self.interfaces.clone(),
            group: self.group,
            port: self.port,
            state_dir: self.state_dir.clone(),
            keys: self.load_keys()?,
            key_file: self.key_file.clone(),
            open: self.open,
            node_id: self.node_id,
            ..DriverConfig::default()
        };
        let limits = &mut driver.engine.store;
        // In range and fitting usize: checked when parsed.
        limits.entries_max = self.max_entries as usize;
        limits.store_bytes_max = self.max_store_bytes as usize;
        limits.tombstone_ttl_ms = self.tombstone_lifetime_s * 1000;
        Ok(driver)
    }
}

/// The JSON form; field names are the contract's C config keys.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct JsonConfig {
    interfaces: Option<Vec<String>>,
    group: Option<String>,
    port: Option<u32>,
    state_dir: Option<String>,
    key_file: Option<String>,
    keys: Option<Vec<String>>,
    open: Option<bool>,
    node_id: Option<String>,
    log_level: Option<String>,
    max_entries: Option<u64>,
    max_store_bytes: Option<u64>,
    tombstone_lifetime_s: Option<u64>,
}

/// Reads a key file (1 or 2 keys); a file others may read is logged.
pub fn load_key_file(path: &Path) -> Result<Vec<GroupKey>, ConfigError> {
    crate::driver::read_key_file(path).map_err(|error| {
        let message = format!("key file {}: {error}", path.display());
        match error {
            KeyFileError::Io(_) => ConfigError::io(message),
            _ => ConfigError::invalid(message),
        }
    })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The control socket the daemon listens on and the CLI talks to when no
/// `--socket` is given. `create`: make the private fallback directory
/// (the daemon); the CLI only looks.
pub fn default_socket(create: bool) -> Result<PathBuf, ConfigError> {
    if is_root() {
        return Ok(PathBuf::from("/var/run/gwsync.sock"));
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir).join("gwsync.sock")),
        _ => Ok(private_dir(create)?.join("gwsync.sock")),
    }
}

/// Where the daemon keeps its state when no `--state-dir` is given.
pub fn default_state_dir() -> Result<PathBuf, ConfigError> {
    if is_root() {
        return Ok(PathBuf::from("/etc/gwsync"));
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir).join("gwsync"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|home| !home.is_empty()) {
        return Ok(PathBuf::from(home).join(".local/state/gwsync"));
    }
    Ok(private_dir(true)?.join("state"))
}

/// `/tmp/gwsync-<uid>`: created mode 0700 when asked, and used only when
/// it is a real directory of ours that no one else may enter. Another user
/// may have created the name first; then we refuse rather than use theirs.
fn private_dir(create: bool) -> Result<PathBuf, ConfigError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let uid = nix::unistd::geteuid().as_raw();
    let dir = std::env::temp_dir().join(format!("gwsync-{uid}"));
    if create {
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => {
                return Err(ConfigError::io(format!(
                    "cannot create {}: {error}",
                    dir.display()
                )));
            }
        }
    }
    let Ok(meta) = std::fs::symlink_metadata(&dir) else {
        return Ok(dir);
    };
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(ConfigError::io(format!(
            "{} is not a private directory of uid {uid} (owner {}, mode {:04o}); \
             another user may have created it: remove it, or set XDG_RUNTIME_DIR or --socket",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn daemon_flags_and_c_json_agree_on_values_and_limits() {
        let flags = Config::from_daemon_args(
            args(
                "--interface br-lan --port 7000 --open --node-id 00ab --max-entries 500 \
                 --max-store-bytes 1000000 --tombstone-lifetime-s 3600 --state-dir /x --socket /y",
            ),
            None,
        )
        .unwrap();
        let json = Config::from_json(
            r#"{"interfaces":["br-lan"],"port":7000,"open":true,"node_id":"00ab",
                "max_entries":500,"max_store_bytes":1000000,"tombstone_lifetime_s":3600}"#,
        )
        .unwrap();
        for config in [&flags, &json] {
            let driver = config.driver_config().unwrap();
            assert_eq!(driver.interfaces, ["br-lan"]);
            assert_eq!(driver.port, 7000);
            assert!(driver.open && driver.keys.is_empty());
            assert_eq!(driver.node_id, Some(NodeId(0xab)));
            assert_eq!(driver.engine.store.entries_max, 500);
            assert_eq!(driver.engine.store.store_bytes_max, 1_000_000);
            assert_eq!(driver.engine.store.tombstone_ttl_ms, 3_600_000);
        }
    }

    #[test]
    fn bad_values_name_the_setting_and_the_limit() {
        let cases = [
            ("--max-entries 0", "--max-entries: expected 1 to"),
            (
                "--tombstone-lifetime-s 5",
                "--tombstone-lifetime-s: expected 60 to",
            ),
            ("--max-store-bytes lots", "--max-store-bytes: expected"),
            ("--interface a/b", "--interface: not an interface name"),
            ("--node-id +1", "--node-id: expected 1 to 16 hex digits"),
            ("--group 10.0.0.1", "--group: not a multicast address"),
            ("--port 0", "--port: not a port number"),
            ("--open --key-file /k", "exclude each other"),
            ("--bogus", "unknown option: --bogus"),
            ("--port", "--port needs a value"),
        ];
        for (flags, expected) in cases {
            let error = Config::from_daemon_args(args(flags), Some("/s".into())).unwrap_err();
            assert_eq!(error.kind, ConfigErrorKind::Invalid, "{flags}");
            assert!(error.message.contains(expected), "{flags}: {error}");
        }
        for (json, expected) in [
            (r#"{"max_entries":0}"#, "\"max_entries\": expected 1 to"),
            (r#"{"port":70000}"#, "\"port\": not a port number"),
            (r#"{"keys":[]}"#, "\"keys\" holds 0 keys"),
            (r#"{"keys":["00"]}"#, "\"keys\"[0]"),
            (r#"{"open":true,"key_file":"/k"}"#, "give one of"),
            (r#"{"port":1,"port":2}"#, "duplicate field"),
            (r#"{"colour":1}"#, "unknown field"),
        ] {
            let error = Config::from_json(json).unwrap_err();
            assert!(error.message.contains(expected), "{json}: {error}");
        }
    }

    #[test]
    fn without_a_key_or_open_mode_there_is_no_driver_config_and_the_error_says_how_to_fix_it() {
        let flags = Config::from_daemon_args(args("--state-dir /x --socket /y"), None).unwrap();
        let error = flags.driver_config().unwrap_err();
        assert!(error.message.contains("--key-file"), "{error}");
        assert!(error.message.contains("--open"), "{error}");
        let json = Config::from_json("{}").unwrap();
        let error = json.driver_config().unwrap_err();
        assert!(error.message.contains("\"open\": true"), "{error}");
        let key = GroupKey::from_bytes([7; 32]).to_hex();
        let keyed = Config::from_json(&format!(r#"{{"keys":["{key}"]}}"#)).unwrap();
        assert_eq!(keyed.driver_config().unwrap().keys.len(), 1);
    }
}
