//! Runs one [`Engine`] over a real multicast socket and the real clock.
//!
//! The driver is the engine's I/O half (the boringtun device loop to the
//! engine's noise core): it owns the socket, the interface watch, the clock
//! and the state directory, and it follows the engine's manual exactly:
//! input, then drain `poll_transmit` and `poll_event`, then persist (after
//! the caller took the changes, when there are any), then wait for the fd
//! or the deadline.
//!
//! # Poll mode
//!
//! The same loop serves the daemon and the C library, so it has no thread
//! and never blocks:
//!
//! 1. wait until [`Driver::fd`] is readable or [`Driver::timeout_ms`] passed
//!    (poll, epoll, select, libubox uloop);
//! 2. call [`Driver::process`];
//! 3. take change events with [`Driver::poll_change`] (or have them handed
//!    to a callback set with [`Driver::on_change`]).
//!
//! [`Driver::fd`] is an epoll fd holding the group socket and the interface
//! watch. It stays the same fd for the driver's life, however often the
//! socket is rebuilt (method step 5: nothing heard for the quiet period),
//! so a caller registers it once. A caller that polls the socket and the
//! watch itself ([`Driver::poll_fds`], as the daemon does) calls
//! [`Driver::process_ready`] instead, which reads only what poll found
//! ready.
//!
//! # Interfaces
//!
//! Each `--interface` is joined by index. One that does not exist yet (the
//! daemon started before its bridge) is logged once and joined as soon as
//! an rtnetlink notification, or the retry timer, shows it. A link that
//! comes back up is left and re-joined (some drivers drop memberships while
//! down; umdns and avahi do the same) and counts as the method's "network
//! initialised", which starts a sync request. An interface recreated with a
//! new index gets a new socket.
//!
//! # Portability
//!
//! Counters are plain integers owned by the driver: no atomics, so nothing
//! here needs the 64-bit atomics that 32-bit MIPS lacks. Times are `u64`
//! milliseconds whatever the width of `usize` or `time_t`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::crypto::{self, CryptoError, GroupKey};
use crate::engine::store::Merged;
use crate::engine::{self, DropReason, Engine, Event, NodeId, TriggerReason, WriteError};
use crate::net::{self, GroupSocket, LinkWatch, Received};
use crate::persist::{self, Debounce, Loaded, StateDir};
use crate::wire::DecodeError;

/// Receive buffer: the largest UDP payload, so nothing a peer can send is
/// cut silently (longer datagrams do not exist; shorter ones are counted
/// as truncated only if the kernel says so).
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Datagrams taken per [`Driver::process`] call, so one call stays short
/// and a flood cannot starve the control socket. The fd stays readable.
const DATAGRAMS_PER_PROCESS_MAX: usize = 256;
/// A datagram that follows the last one by at least this long came alone:
/// [`Driver::process_ready`] reads it without the read that would find the
/// socket empty. Closer ones are a burst, read until the socket is empty.
const LONE_DATAGRAM_GAP_MS: u64 = 2;
/// Change events kept for [`Driver::poll_change`] when nobody drains them.
const CHANGES_QUEUED_MAX: usize = 65_536;
/// Retry period for interfaces that are missing or failed to join, and for
/// a socket that failed to open.
const RETRY_INTERVAL_MS: u64 = 3_000;
/// Changes `status` lists in `recent_changes`, newest first.
pub const RECENT_CHANGES_MAX: usize = 16;
/// A sender heard with another key counts in `status` for this long after
/// its last such datagram.
pub const OTHER_KEY_RECENT_MS: u64 = 10 * 60 * 1000;
/// Addresses remembered as sending with another key; the least recently
/// heard is forgotten first (counted in `other_key_senders_forgotten`).
pub const OTHER_KEY_SENDERS_MAX: usize = 32;
/// At most one "another key" warning per this interval while it goes on.
pub const OTHER_KEY_WARN_INTERVAL_MS: u64 = 60 * 1000;
/// At most one "cannot save state" error line per this interval while
/// saves keep failing (each failure is still counted).
pub const PERSIST_ERROR_LOG_INTERVAL_MS: u64 = 60 * 1000;

/// A state write due when a change is handed out waits this long after it.
/// Whoever takes changes (watchers, ubus, C callbacks) hears of them before
/// the write (a serialisation of the whole store and two fsyncs: milliseconds
/// on flash), and so do the other daemons of a host that runs several (the
/// benches and tests: eight receivers' writes on two cores held a lone
/// write back 6 ms). Set at the first change and not moved by later ones,
/// so a stream of changes cannot put the write off for good.
pub const SAVE_SETTLE_MS: u64 = 20;

/// How to run a driver. Every field has a default.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Interfaces to join by name; empty: the kernel's choice (index 0).
    pub interfaces: Vec<String>,
    pub group: IpAddr,
    pub port: u16,
    /// Where the node id and state live; `None`: memory only.
    pub state_dir: Option<PathBuf>,
    /// The group keys, 1 or 2: the first seals every datagram sent, both
    /// open datagrams received (a rotation in progress). Empty only when
    /// `open` is set.
    pub keys: Vec<GroupKey>,
    /// Where `keys` came from, read again by [`Driver::reload_keys`].
    pub key_file: Option<PathBuf>,
    /// Run without keys: every host on the LAN can read and change every
    /// value. Must be asked for; without keys and without it `open` fails.
    pub open: bool,
    /// Overrides the persisted node id.
    pub node_id: Option<NodeId>,
    pub engine: engine::Config,
    /// At most one state write per this many milliseconds in a burst.
    pub persist_interval_ms: u64,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            interfaces: Vec::new(),
            group: IpAddr::V4(net::GROUP_V4_DEFAULT),
            port: net::PORT_DEFAULT,
            state_dir: None,
            keys: Vec::new(),
            key_file: None,
            open: false,
            node_id: None,
            engine: engine::Config::default(),
            persist_interval_ms: 2_000,
        }
    }
}

/// Why [`Driver::open`] failed.
#[derive(Debug)]
pub enum OpenError {
    /// No key and open mode not asked for.
    NoKey,
    /// The state directory could not be created or written.
    State(persist::PersistError),
    /// The epoll fd could not be created.
    Poll(io::Error),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::NoKey => f.write_str(
                "no group key and open mode not asked for: give a key, or set open mode \
                 knowing that every host on the LAN can then read and change every value",
            ),
            OpenError::State(error) => error.fmt(f),
            OpenError::Poll(error) => write!(f, "epoll: {error}"),
        }
    }
}

impl std::error::Error for OpenError {}

/// Why [`Driver::set`] or [`Driver::delete`] refused a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetError {
    /// The value is not one JSON value; the parser's message.
    InvalidJson(String),
    /// The engine refused it (key, size, store limits, unknown key).
    Write(WriteError),
    /// The write was applied and sent to the group, but the state
    /// directory cannot be written (the text says why): it is lost at a
    /// restart unless saving recovers first.
    NotPersisted(String),
}

impl fmt::Display for SetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetError::InvalidJson(message) => write!(f, "value is not valid JSON: {message}"),
            SetError::Write(error) => error.fmt(f),
            SetError::NotPersisted(error) => write!(
                f,
                "applied and sent to the other gateways, but NOT saved: {error}"
            ),
        }
    }
}

impl std::error::Error for SetError {}

/// How many refused entries a load report spells out.
pub const LOAD_ERRORS_SHOWN: usize = 5;

/// What `Driver::load` did with each entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Newer than what was held (or unknown here): now stored.
    pub applied: usize,
    /// Already held exactly so.
    pub unchanged: usize,
    /// This gateway holds a newer entry (or, for an entry without a
    /// version, any entry) for the key: not overwritten.
    pub kept_newer: usize,
    /// Refused by a limit; the first few reasons are in `errors`.
    pub rejected: usize,
    pub errors: Vec<String>,
}

/// An entry changed, by a local write or from the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeEvent {
    pub key: String,
    /// The new value as JSON text; `None` when the key was deleted.
    pub value: Option<String>,
    pub origin: NodeId,
}

impl ChangeEvent {
    /// From the engine's event. A value is JSON text, so valid UTF-8: its
    /// bytes become the string without a copy (a peer's bytes that are not
    /// are shown lossily).
    pub fn new(key: String, value: Option<Box<[u8]>>, origin: NodeId) -> ChangeEvent {
        let value = value.map(|bytes| {
            String::from_utf8(bytes.into_vec())
                .unwrap_or_else(|invalid| String::from_utf8_lossy(invalid.as_bytes()).into_owned())
        });
        ChangeEvent { key, value, origin }
    }
}

/// Receives change events instead of the queue (see [`Driver::on_change`]).
pub type ChangeCallback = Box<dyn FnMut(&ChangeEvent) + Send>;

/// I/O counters, next to the engine's own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DriverCounters {
    pub recv_errors: u64,
    pub recv_truncated: u64,
    pub recv_interrupted: u64,
    /// Datagrams read alone (see [`Driver::process_ready`]).
    pub recv_alone: u64,
    pub send_errors: u64,
    pub send_no_buffers: u64,
    pub socket_opens: u64,
    pub socket_open_errors: u64,
    pub join_errors: u64,
    pub state_writes: u64,
    pub state_write_errors: u64,
    pub changes_dropped: u64,
    pub other_key_datagrams: u64,
    pub other_key_senders_forgotten: u64,
    pub key_reloads: u64,
    pub key_reload_errors: u64,
}

/// One change as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RecentChange {
    key: String,
    origin: NodeId,
    at_ms: u64,
    deleted: bool,
}

/// Datagrams from one address that no key of ours opens.
#[derive(Clone, Copy, Debug, Default)]
struct OtherKeySender {
    /// Reset once it has been quiet for the recent window.
    datagrams: u64,
    last_ms: u64,
}

/// Whether a drop means the sender uses a key we do not have (or none
/// while we have one, or one while we have none).
fn is_other_key(reason: DropReason) -> bool {
    matches!(
        reason,
        DropReason::Crypto(
            CryptoError::UnknownKeyId | CryptoError::BadTag | CryptoError::NotEncrypted
        ) | DropReason::Decode(DecodeError::BadKey | DecodeError::Unencrypted)
    )
}

fn other_key_drops(counters: &engine::Counters) -> u64 {
    counters
        .dropped
        .iter()
        .filter(|(reason, _)| is_other_key(**reason))
        .map(|(_, count)| count)
        .sum()
}

#[derive(Debug)]
struct Interface {
    /// `None` for the no-`--interface` default.
    name: Option<String>,
    index: Option<u32>,
    joined: bool,
    up: bool,
    reported_missing: bool,
}

/// Log a repeated failure on its 1st, 2nd, 4th, 8th... occurrence, so a
/// broken link cannot flood a 64 KiB syslog ring.
fn worth_logging(count: u64) -> bool {
    count.is_power_of_two()
}

/// One value for each of the driver's descriptors: the fds
/// ([`Driver::poll_fds`]) or whether poll found them readable
/// ([`Readiness`]).
#[derive(Clone, Copy, Debug)]
pub struct Sources<T> {
    pub datagrams: T,
    pub link: T,
}

pub type Readiness = Sources<bool>;

impl Readiness {
    /// Nothing known: probe both, as [`Driver::process`] does.
    pub const UNKNOWN: Readiness = Sources {
        datagrams: true,
        link: true,
    };
}

/// One gateway: an engine, its socket, its clock and its state.
pub struct Driver {
    config: DriverConfig,
    engine: Engine,
    epoll: Epoll,
    socket: Option<GroupSocket>,
    link_watch: Option<LinkWatch>,
    interfaces: Vec<Interface>,
    retry_due: Option<u64>,
    start: Instant,
    state: Option<StateDir>,
    debounce: Debounce,
    changes: VecDeque<ChangeEvent>,
    /// A change was just handed out: the state write waits until then
    /// (see [`SAVE_SETTLE_MS`]).
    save_not_before: Option<u64>,
    on_change: Option<ChangeCallback>,
    counters: DriverCounters,
    recv_buffer: Vec<u8>,
    last_datagram_ms: Option<u64>,
    recent_changes: VecDeque<RecentChange>,
    other_key: BTreeMap<IpAddr, OtherKeySender>,
    other_key_warned_at: Option<u64>,
    /// Why the last save failed; `None` while saving works.
    persist_error: Option<String>,
    persist_error_logged_at: Option<u64>,
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Driver")
            .field("node_id", &self.engine.node_id())
            .field("group", &self.config.group)
            .field("port", &self.config.port)
            .finish_non_exhaustive()
    }
}

const TOKEN_SOCKET: u64 = 1;
const TOKEN_LINK_WATCH: u64 = 2;

impl Driver {
    /// Loads the state, opens the socket and joins what can be joined.
    /// Missing interfaces and a socket that cannot open yet are not errors:
    /// they are retried. Only an unusable state directory is.
    pub fn open(config: DriverConfig) -> Result<Driver, OpenError> {
        if config.keys.is_empty() && !config.open {
            return Err(OpenError::NoKey);
        }
        let mut rng = StdRng::from_os_rng();
        let state = match &config.state_dir {
            Some(dir) => Some(StateDir::open(dir).map_err(OpenError::State)?),
            None => None,
        };
        let node_id = match (
            config.node_id,
            state.as_ref().and_then(StateDir::load_node_id),
        ) {
            (Some(id), _) => id,
            (None, Some(id)) => id,
            (None, None) => NodeId(rng.random()),
        };
        if let Some(state) = &state {
            if state.load_node_id() != Some(node_id) {
                state.save_node_id(node_id).map_err(OpenError::State)?;
            }
        }
        let start = Instant::now();
        let mut engine = Engine::new(config.engine.clone(), node_id, rng.random(), 0);
        engine.set_wall_clock(0, Self::wall_ms());
        if let Some(state) = &state {
            match state.load() {
                Loaded::Empty => log::info!(
                    "no saved state in {}: starting empty",
                    state.path().display()
                ),
                Loaded::State { clock, entries } => {
                    let count = entries.len();
                    engine.restore(clock, entries);
                    log::info!(
                        "restored {count} entries from {}",
                        state.state_path().display()
                    );
                }
                Loaded::Corrupt { reason, moved_to } => log::error!(
                    "state file {} is corrupt ({reason}); moved it to {} and starting empty, \
                     the data will resync from the other gateways",
                    state.state_path().display(),
                    moved_to.display()
                ),
            }
        }
        match crypto::keyring_of(&config.keys) {
            Some(keyring) => {
                log::info!("group keys: {}", describe_keys(&config.keys));
                engine.set_keyring(Some(keyring), StdRng::from_os_rng());
            }
            None => log::warn!(
                "open mode: datagrams are neither authenticated nor encrypted; every host \
                 on the LAN can read and change every value"
            ),
        }
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|errno| OpenError::Poll(errno.into()))?;
        let link_watch = match LinkWatch::open() {
            Ok(watch) => {
                let event = EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_LINK_WATCH);
                match epoll.add(watch.as_fd(), event) {
                    Ok(()) => Some(watch),
                    Err(errno) => {
                        log::warn!("interface watch unavailable ({errno}); polling interfaces");
                        None
                    }
                }
            }
            Err(error) => {
                log::warn!("interface watch unavailable ({error}); polling interfaces");
                None
            }
        };
        let interfaces = if config.interfaces.is_empty() {
            vec![Interface {
                name: None,
                index: Some(0),
                joined: false,
                up: true,
                reported_missing: false,
            }]
        } else {
            config
                .interfaces
                .iter()
                .map(|name| Interface {
                    name: Some(name.clone()),
                    index: None,
                    joined: false,
                    up: false,
                    reported_missing: false,
                })
                .collect()
        };
        let debounce = Debounce::new(config.persist_interval_ms, engine.state_generation());
        let mut driver = Driver {
            config,
            engine,
            epoll,
            socket: None,
            link_watch,
            interfaces,
            retry_due: None,
            start,
            state,
            debounce,
            changes: VecDeque::new(),
            save_not_before: None,
            on_change: None,
            counters: DriverCounters::default(),
            recv_buffer: vec![0; RECV_BUFFER_BYTES],
            last_datagram_ms: None,
            recent_changes: VecDeque::new(),
            other_key: BTreeMap::new(),
            other_key_warned_at: None,
            persist_error: None,
            persist_error_logged_at: None,
        };
        log::info!(
            "node {} on group {} port {}",
            driver.engine.node_id(),
            driver.config.group,
            driver.config.port
        );
        driver.rebuild_socket();
        let now = driver.now();
        driver.engine.trigger(now, TriggerReason::PowerOn);
        driver.flush_transmits();
        Ok(driver)
    }

    /// Monotonic milliseconds since open (CLOCK_MONOTONIC via `Instant`).
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn wall_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as u64)
    }

    /// The one fd to poll for readable. Valid until the driver is dropped.
    pub fn fd(&self) -> RawFd {
        self.epoll.0.as_raw_fd()
    }

    /// Milliseconds until [`Driver::process`] must run even if the fd stays
    /// quiet; `Some(0)` when it is due now. Always `Some` today (the engine
    /// always has a deadline); `None` is kept for "no deadline".
    pub fn timeout_ms(&self) -> Option<u64> {
        let deadline = self.deadline();
        Some(deadline.saturating_sub(self.now()))
    }

    fn deadline(&self) -> u64 {
        let mut deadline = self.engine.poll_timeout();
        if self.state.is_some() {
            if let Some(due) = self.debounce.due(self.engine.state_generation()) {
                deadline = deadline.min(due.max(self.save_not_before.unwrap_or(0)));
            }
        }
        if let Some(due) = self.retry_due {
            deadline = deadline.min(due);
        }
        deadline
    }

    /// Does everything that is ready, without blocking: receives pending
    /// datagrams, handles interface changes, runs due timers, sends, and
    /// writes the state when the debounce (and [`SAVE_SETTLE_MS`]) allows.
    pub fn process(&mut self) {
        self.process_sources(Readiness::UNKNOWN, true);
    }

    /// The group socket and the interface watch (either may be absent), for
    /// a caller that polls them itself rather than [`Driver::fd`] and so
    /// can tell [`Driver::process_ready`] which have input. Fetch them
    /// before each poll: the socket is rebuilt now and then.
    pub fn poll_fds(&self) -> Sources<Option<BorrowedFd<'_>>> {
        Sources {
            datagrams: self.socket.as_ref().map(AsFd::as_fd),
            link: self.link_watch.as_ref().map(AsFd::as_fd),
        }
    }

    /// [`Driver::process`] that reads only the descriptors poll found
    /// readable: on a receiving gateway a wake is one datagram, and the
    /// probes of the rest cost more than handling it. For the same reason
    /// a datagram that came alone is read alone, so the caller's wait must
    /// be level-triggered: one left behind ends the next wait at once.
    pub fn process_ready(&mut self, ready: Readiness) {
        self.process_sources(ready, false);
    }

    fn process_sources(&mut self, ready: Readiness, drain: bool) {
        if ready.link && self.link_watch.as_ref().is_some_and(LinkWatch::drain) {
            self.check_interfaces();
        }
        if self.retry_due.is_some_and(|due| due <= self.now()) {
            self.retry_due = None;
            if self.socket.is_none() {
                self.rebuild_socket();
            } else {
                self.check_interfaces();
            }
        }
        if ready.datagrams {
            self.receive(drain);
        }
        self.run_due_timers();
        if self.save_not_before.is_none_or(|at| at <= self.now()) {
            self.save_not_before = None;
            self.maybe_persist(false);
        }
    }

    /// Reads datagrams until the socket is empty, or only the first when
    /// `drain` is false and it came alone.
    fn receive(&mut self, drain: bool) {
        let Some(socket) = &self.socket else { return };
        let mut taken = 0;
        let mut other_key_heard = Vec::new();
        let mut alone = false;
        while taken < DATAGRAMS_PER_PROCESS_MAX && !alone {
            match socket.recv_from(&mut self.recv_buffer) {
                Ok((Received::Datagram(len), from)) => {
                    taken += 1;
                    let now = self.start.elapsed().as_millis() as u64;
                    alone = !drain
                        && taken == 1
                        && self
                            .last_datagram_ms
                            .is_none_or(|last| now.saturating_sub(last) >= LONE_DATAGRAM_GAP_MS);
                    self.last_datagram_ms = Some(now);
                    if alone {
                        self.counters.recv_alone += 1;
                    }
                    self.engine.set_wall_clock(now, Self::wall_ms());
                    let before = other_key_drops(self.engine.counters());
                    self.engine.handle_datagram(now, &self.recv_buffer[..len]);
                    if other_key_drops(self.engine.counters()) != before {
                        if let Some(from) = from {
                            other_key_heard.push((now, from));
                        }
                    }
                }
                Ok((Received::Truncated(len), _)) => {
                    taken += 1;
                    self.counters.recv_truncated += 1;
                    if worth_logging(self.counters.recv_truncated) {
                        log::warn!("dropped a {len}-byte datagram: larger than the receive buffer");
                    }
                }
                Ok((Received::Empty, _)) => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {
                    self.counters.recv_interrupted += 1;
                }
                Err(error) => {
                    self.counters.recv_errors += 1;
                    if worth_logging(self.counters.recv_errors) {
                        log::warn!(
                            "receive failed ({} times): {error}",
                            self.counters.recv_errors
                        );
                    }
                    break;
                }
            }
        }
        for (now, from) in other_key_heard {
            self.heard_other_key(now, from);
        }
        // Applying datagrams may have produced answers and events.
        self.drain_events();
        self.warn_other_key();
    }

    fn heard_other_key(&mut self, now: u64, from: IpAddr) {
        self.counters.other_key_datagrams += 1;
        if !self.other_key.contains_key(&from) && self.other_key.len() >= OTHER_KEY_SENDERS_MAX {
            if let Some(oldest) = self
                .other_key
                .iter()
                .min_by_key(|(_, sender)| sender.last_ms)
                .map(|(address, _)| *address)
            {
                self.other_key.remove(&oldest);
                self.counters.other_key_senders_forgotten += 1;
            }
        }
        let sender = self.other_key.entry(from).or_default();
        if sender.datagrams == 0 || now.saturating_sub(sender.last_ms) > OTHER_KEY_RECENT_MS {
            *sender = OtherKeySender {
                datagrams: 0,
                last_ms: now,
            };
        }
        sender.datagrams += 1;
        sender.last_ms = now;
    }

    /// Senders heard with another key within [`OTHER_KEY_RECENT_MS`].
    fn other_key_recent(&self, now: u64) -> impl Iterator<Item = (&IpAddr, &OtherKeySender)> {
        self.other_key
            .iter()
            .filter(move |(_, sender)| now.saturating_sub(sender.last_ms) <= OTHER_KEY_RECENT_MS)
    }

    /// The loud half of "wrong key": a warning naming the count and the
    /// addresses, at most once per [`OTHER_KEY_WARN_INTERVAL_MS`].
    fn warn_other_key(&mut self) {
        let now = self.now();
        let due = self
            .other_key_warned_at
            .is_none_or(|at| now.saturating_sub(at) >= OTHER_KEY_WARN_INTERVAL_MS);
        if !due {
            return;
        }
        let since = self.other_key_warned_at.unwrap_or(0);
        let fresh: Vec<(IpAddr, u64)> = self
            .other_key_recent(now)
            .filter(|(_, sender)| sender.last_ms >= since)
            .map(|(address, sender)| (*address, sender.datagrams))
            .collect();
        if fresh.is_empty() {
            return;
        }
        self.other_key_warned_at = Some(now);
        let datagrams: u64 = fresh.iter().map(|(_, count)| count).sum();
        let addresses: Vec<String> = fresh
            .iter()
            .map(|(address, _)| address.to_string())
            .collect();
        log::warn!(
            "hearing {} gateway(s) with another key: {datagrams} datagram(s) that no key of ours \
             opens, from {}; they are NOT in sync with us. Give every gateway the same key file \
             (ours: {})",
            fresh.len(),
            addresses.join(", "),
            if self.engine.is_keyed() {
                "keyed"
            } else {
                "open mode"
            },
        );
    }

    /// Reads the key file again and uses its keys from now on (SIGHUP,
    /// `gwsync reload`). The state, the peers and the socket stay. On any
    /// error the keys in use stay too. Returns how many keys are in use.
    pub fn reload_keys(&mut self) -> Result<usize, String> {
        let Some(path) = self.config.key_file.clone() else {
            return Err(if self.config.open {
                "open mode: there is no key file to reload".to_owned()
            } else {
                "the keys were not given in a key file: nothing to reload".to_owned()
            });
        };
        // crypto's loader, not config's: config builds on the driver.
        let loaded = crypto::load_key_file(&path)
            .map_err(|error| format!("key file {}: {error}", path.display()));
        let keys = match loaded {
            Ok((keys, warning)) => {
                if let Some(warning) = warning {
                    log::warn!("key file {}: {warning}", path.display());
                }
                keys
            }
            Err(error) => {
                self.counters.key_reload_errors += 1;
                let message = format!(
                    "key file {}: {error}; keeping the keys in use",
                    path.display()
                );
                log::error!("reload: {message}");
                return Err(message);
            }
        };
        self.counters.key_reloads += 1;
        log::info!(
            "reload: group keys from {}: {}",
            path.display(),
            describe_keys(&keys)
        );
        self.engine
            .set_keyring(crypto::keyring_of(&keys), StdRng::from_os_rng());
        let count = keys.len();
        self.config.keys = keys;
        // Anything sealed with the old key while a peer had only the new
        // one is repaired by the next exchange; start it now.
        let now = self.now();
        self.engine.trigger(now, TriggerReason::Manual);
        self.flush_transmits();
        Ok(count)
    }

    /// Runs the engine's timers that are due and sends what they queued.
    fn run_due_timers(&mut self) {
        let now = self.now();
        self.engine.set_wall_clock(now, Self::wall_ms());
        if self.engine.poll_timeout() <= now {
            self.engine.handle_timeout(now);
        }
        self.flush_transmits();
    }

    /// Sends what the engine queued, then handles its events.
    fn flush_transmits(&mut self) {
        while let Some(datagram) = self.engine.poll_transmit() {
            self.send(&datagram);
        }
        self.drain_events();
    }

    fn send(&mut self, datagram: &[u8]) {
        let Some(socket) = &self.socket else {
            // No socket yet: the datagram is lost like any other; Trickle and
            // the repair protocol recover once the socket is back.
            self.counters.send_errors += 1;
            return;
        };
        for interface in &self.interfaces {
            let Some(index) = interface.index.filter(|_| interface.joined) else {
                continue;
            };
            match socket.send(index, datagram) {
                Ok(_) => {}
                Err(error) => {
                    if error.raw_os_error() == Some(libc::ENOBUFS) {
                        self.counters.send_no_buffers += 1;
                    }
                    self.counters.send_errors += 1;
                    if worth_logging(self.counters.send_errors) {
                        log::warn!(
                            "send on {} failed ({} times): {error}",
                            interface.name.as_deref().unwrap_or("default interface"),
                            self.counters.send_errors
                        );
                    }
                }
            }
        }
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.engine.poll_event() {
            match event {
                Event::Changed { key, value, origin } => {
                    let change = ChangeEvent::new(key, value, origin);
                    if self.recent_changes.len() == RECENT_CHANGES_MAX {
                        self.recent_changes.pop_back();
                    }
                    self.recent_changes.push_front(RecentChange {
                        key: change.key.clone(),
                        origin,
                        at_ms: self.start.elapsed().as_millis() as u64,
                        deleted: change.value.is_none(),
                    });
                    log::debug!("changed {} (origin {})", change.key, change.origin);
                    if self.save_not_before.is_none() {
                        self.save_not_before = Some(self.now() + SAVE_SETTLE_MS);
                    }
                    if let Some(callback) = &mut self.on_change {
                        callback(&change);
                    } else if self.changes.len() < CHANGES_QUEUED_MAX {
                        self.changes.push_back(change);
                    } else {
                        self.counters.changes_dropped += 1;
                    }
                }
                Event::PeerDiscovered(peer) => {
                    log::info!("heard gateway {peer} for the first time")
                }
                Event::RebuildSocket => {
                    log::info!("nothing heard from any gateway for a while: rebuilding the socket");
                    self.rebuild_socket();
                }
                Event::NodeIdClash { old, new } => {
                    log::warn!(
                        "node id {old} clashed with another gateway (cloned image?); now {new}"
                    );
                    if let Some(state) = &self.state {
                        if let Err(error) = state.save_node_id(new) {
                            log::error!("could not save the new node id: {error}");
                        }
                    }
                }
            }
        }
    }

    /// Closes the socket (if any), opens a new one and joins every
    /// interface that exists. The epoll fd stays the same.
    fn rebuild_socket(&mut self) {
        if let Some(old) = self.socket.take() {
            let _ = self.epoll.delete(old.as_fd());
        }
        for interface in &mut self.interfaces {
            interface.joined = false;
        }
        match GroupSocket::open(self.config.group, self.config.port) {
            Ok(socket) => {
                let event = EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_SOCKET);
                if let Err(errno) = self.epoll.add(socket.as_fd(), event) {
                    self.socket_open_failed(errno.into());
                    return;
                }
                self.counters.socket_opens += 1;
                self.socket = Some(socket);
                self.check_interfaces();
            }
            Err(error) => self.socket_open_failed(error),
        }
    }

    fn socket_open_failed(&mut self, error: io::Error) {
        self.counters.socket_open_errors += 1;
        if worth_logging(self.counters.socket_open_errors) {
            log::error!(
                "cannot open the multicast socket on port {} ({} times): {error}; retrying",
                self.config.port,
                self.counters.socket_open_errors
            );
        }
        self.retry_due = Some(self.now() + RETRY_INTERVAL_MS);
    }

    /// Brings memberships in line with the interfaces as they are now.
    fn check_interfaces(&mut self) {
        let Some(socket) = &self.socket else { return };
        let mut network_up = false;
        let mut need_retry = false;
        let mut rebuild = false;
        for interface in &mut self.interfaces {
            let Some(name) = interface.name.clone() else {
                // The default interface: nothing to watch, only to join.
                if !interface.joined {
                    match socket.join(0) {
                        Ok(()) => {
                            interface.joined = true;
                            network_up = true;
                            log::info!("joined group {} on the default interface", socket.group());
                        }
                        Err(error) => {
                            need_retry = true;
                            self.counters.join_errors += 1;
                            if worth_logging(self.counters.join_errors) {
                                log::warn!(
                                    "cannot join group {} yet: {error}; retrying",
                                    socket.group()
                                );
                            }
                        }
                    }
                }
                continue;
            };
            let index = net::interface_index(&name);
            let up = index.is_some() && net::interface_is_up(&name);
            if index != interface.index {
                if interface.joined && interface.index.is_some() {
                    // Recreated with a new index (br-lan rebuilt): memberships
                    // of the old index are gone with it; start clean.
                    log::info!("interface {name} was recreated; rebuilding the socket");
                    rebuild = true;
                }
                interface.index = index;
                interface.joined = false;
            }
            let Some(index) = index else {
                need_retry = true;
                if !interface.reported_missing {
                    interface.reported_missing = true;
                    log::warn!("interface {name} does not exist (yet); will join when it appears");
                }
                interface.up = false;
                continue;
            };
            if interface.joined && up && !interface.up {
                // Some drivers drop memberships while down: leave and re-join.
                let _ = socket.leave(index);
                interface.joined = false;
                log::info!("interface {name} is up again");
                network_up = true;
            }
            if !up && interface.up {
                log::info!("interface {name} is down");
            }
            interface.up = up;
            if !interface.joined {
                match socket.join(index) {
                    Ok(()) => {
                        interface.joined = true;
                        network_up = true;
                        if interface.reported_missing {
                            log::info!("interface {name} appeared");
                        }
                        interface.reported_missing = false;
                        log::info!("joined group {} on {name} (index {index})", socket.group());
                    }
                    Err(error) => {
                        need_retry = true;
                        self.counters.join_errors += 1;
                        if worth_logging(self.counters.join_errors) {
                            log::warn!(
                                "cannot join group {} on {name} yet: {error}; retrying",
                                socket.group()
                            );
                        }
                    }
                }
            }
        }
        if rebuild {
            return self.rebuild_socket();
        }
        let now = self.now();
        if need_retry || self.link_watch.is_none() {
            self.retry_due.get_or_insert(now + RETRY_INTERVAL_MS);
        }
        if network_up {
            self.engine.trigger(now, TriggerReason::NetworkUp);
        }
    }

    fn maybe_persist(&mut self, force: bool) {
        let Some(state) = &self.state else { return };
        let generation = self.engine.state_generation();
        let now = self.now();
        let due = match self.debounce.due(generation) {
            Some(due) => force || due <= now,
            None => false,
        };
        if !due {
            return;
        }
        match state.save(&self.engine) {
            Ok(()) => {
                self.counters.state_writes += 1;
                self.debounce.written(now, generation);
                if let Some(error) = self.persist_error.take() {
                    log::warn!(
                        "state saved again in {} (it had failed: {error}); nothing is unsaved",
                        state.path().display()
                    );
                }
            }
            Err(error) => {
                self.counters.state_write_errors += 1;
                // Try again after one interval, not in a tight loop.
                self.debounce.failed(now);
                let due = self
                    .persist_error_logged_at
                    .is_none_or(|at| now.saturating_sub(at) >= PERSIST_ERROR_LOG_INTERVAL_MS);
                if self.persist_error.is_none() || due {
                    self.persist_error_logged_at = Some(now);
                    log::error!(
                        "could not save state ({} failures so far): {error}; {} change(s) are \
                         only in memory and are lost at a restart until saving works again",
                        self.counters.state_write_errors,
                        self.unsaved_changes()
                    );
                }
                self.persist_error = Some(error.to_string());
            }
        }
    }

    /// Changes made since the state was last saved (0 without a state dir).
    pub fn unsaved_changes(&self) -> u64 {
        if self.state.is_none() {
            return 0;
        }
        self.engine
            .state_generation()
            .wrapping_sub(self.debounce.written_generation())
    }

    /// Why the last save failed, while saving fails.
    pub fn persist_error(&self) -> Option<&str> {
        self.persist_error.as_deref()
    }

    /// Writes pending state now, whatever the debounce says (SIGTERM,
    /// close). Err: the save failed, and the text says what is lost.
    pub fn flush(&mut self) -> Result<(), String> {
        self.maybe_persist(true);
        match (&self.persist_error, self.unsaved_changes()) {
            (Some(error), unsaved) if unsaved > 0 => Err(format!(
                "could not save state: {error}; {unsaved} change(s) since the last save are lost"
            )),
            _ => Ok(()),
        }
    }

    /// Errs with [`SetError::NotPersisted`] while saving fails, after a
    /// write that was applied all the same.
    fn persisted(&mut self) -> Result<(), SetError> {
        if self.persist_error.is_some() {
            // A save may be due again (the space was freed): try now so the
            // answer is current.
            self.maybe_persist(false);
        }
        match &self.persist_error {
            Some(error) => Err(SetError::NotPersisted(error.clone())),
            None => Ok(()),
        }
    }

    /// Writes a JSON value. The text is validated and stored compact.
    pub fn set(&mut self, key: &str, value_json: &str) -> Result<(), SetError> {
        let compact = compact_json(value_json).map_err(SetError::InvalidJson)?;
        let now = self.now();
        self.engine
            .set(now, Self::wall_ms(), key, compact.as_bytes())
            .map_err(SetError::Write)?;
        // A lone write's push is due at once: it leaves before the caller
        // is answered (a reply first wakes the client, and on a small CPU
        // the push then waited for the loop's next turn).
        self.run_due_timers();
        self.persisted()
    }

    /// Deletes a key; [`WriteError::NotFound`] when it holds no value.
    pub fn delete(&mut self, key: &str) -> Result<(), SetError> {
        let now = self.now();
        self.engine
            .delete(now, Self::wall_ms(), key)
            .map_err(SetError::Write)?;
        self.run_due_timers();
        self.persisted()
    }

    /// Restores entries (from `gwsync load`) by the merge rule. An entry
    /// with a version (from a state file) is merged like one heard from
    /// the group: it applies only when newer than what is held. One without
    /// (from a plain dump) carries no time, so it never overwrites a key
    /// this gateway holds or deleted; it is only written where the key is
    /// unknown here.
    pub fn load(&mut self, entries: Vec<persist::Loadable>) -> LoadReport {
        let mut report = LoadReport::default();
        let now = self.now();
        for (key, version, value) in entries {
            let held = self.engine.store().get(&key).map(|held| held.to_owned());
            // A tombstone for a key unknown here changes nothing either.
            let same = match &held {
                Some(held) => held.value == value,
                None => value.is_none(),
            };
            let outcome = match (version, held) {
                (Some(version), _) => {
                    match self
                        .engine
                        .load_entry(now, key.clone(), version, value.clone())
                    {
                        Merged::Applied => Ok(true),
                        Merged::Stale => Ok(false),
                        Merged::Rejected(rejected) => Err(SetError::Write(rejected.into())),
                    }
                }
                (None, Some(_)) => Ok(false),
                (None, None) => match &value {
                    None => Ok(false),
                    Some(bytes) => {
                        let text = String::from_utf8_lossy(bytes).into_owned();
                        match self.set(&key, &text) {
                            // Applied; the state file's trouble is in `status`.
                            Ok(()) | Err(SetError::NotPersisted(_)) => Ok(true),
                            Err(failure) => Err(failure),
                        }
                    }
                },
            };
            match outcome {
                Ok(true) => report.applied += 1,
                Ok(false) if same => report.unchanged += 1,
                Ok(false) => report.kept_newer += 1,
                Err(error) => {
                    report.rejected += 1;
                    if report.errors.len() < LOAD_ERRORS_SHOWN {
                        let value_text = value
                            .as_deref()
                            .map(String::from_utf8_lossy)
                            .unwrap_or_default();
                        report.errors.push(self.explain(&key, &value_text, &error));
                    }
                }
            }
            self.drain_events();
        }
        self.flush_transmits();
        report
    }

    /// A refused `set` or `delete` for a person: names the key and the
    /// limit it hit. `value_json` is the value given to `set` ("" for a
    /// delete).
    pub fn explain(&self, key: &str, value_json: &str, error: &SetError) -> String {
        match error {
            SetError::InvalidJson(message) => format!(
                "value for key {} is not valid JSON: {message}",
                crate::engine::shown_key(key)
            ),
            SetError::Write(write) => {
                write.explain(key, value_json.len(), &self.engine.config().store)
            }
            SetError::NotPersisted(_) => {
                format!("key {}: {error}", crate::engine::shown_key(key))
            }
        }
    }

    /// The value of a key as JSON text.
    pub fn get(&self, key: &str) -> Option<String> {
        self.engine
            .get(key)
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
    }

    /// Keys holding a value that start with `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .engine
            .store()
            .iter()
            .filter(|(key, entry)| !entry.is_tombstone() && key.starts_with(prefix))
            .map(|(key, _)| key.to_owned())
            .collect();
        keys.sort_unstable();
        keys
    }

    /// Every live entry as one JSON object text, keys sorted. Values that
    /// are not JSON (possible only from a misbehaving peer) become strings.
    pub fn dump(&self) -> String {
        let entries: BTreeMap<&str, StoredValue<'_>> = self
            .engine
            .store()
            .iter()
            .filter_map(|(key, entry)| entry.value.map(|value| (key, StoredValue::of(value))))
            .collect();
        serde_json::to_string(&entries).unwrap_or_default()
    }

    /// Starts a sync request (method step 5).
    pub fn trigger(&mut self, reason: TriggerReason) {
        let now = self.now();
        if reason == TriggerReason::NetworkUp {
            // The network was re-initialised under us: memberships may be
            // gone, so take a new socket as well.
            self.rebuild_socket();
        }
        self.engine.trigger(now, reason);
        self.flush_transmits();
    }

    /// Sets a callback for change events instead of the queue.
    pub fn on_change(&mut self, callback: Option<ChangeCallback>) {
        self.on_change = callback;
    }

    /// The next change event, when no callback is set.
    pub fn poll_change(&mut self) -> Option<ChangeEvent> {
        self.changes.pop_front()
    }

    pub fn node_id(&self) -> NodeId {
        self.engine.node_id()
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn counters(&self) -> &DriverCounters {
        &self.counters
    }

    pub fn config(&self) -> &DriverConfig {
        &self.config
    }

    /// Everything `gwsync status` shows (the contract's status object).
    pub fn status(&self) -> Status {
        let now = self.now();
        let engine_counters = self.engine.counters();
        let store = self.engine.store();
        let our_digest = store.digest();
        let c = &self.counters;
        let other_key: Vec<(&IpAddr, &OtherKeySender)> = self.other_key_recent(now).collect();
        let change = |change: &RecentChange| ChangeStatus {
            key: change.key.clone(),
            origin: change.origin.to_string(),
            ms_ago: now.saturating_sub(change.at_ms),
            deleted: change.deleted,
        };
        let limits = &self.engine.config().store;
        Status {
            version: env!("CARGO_PKG_VERSION"),
            node_id: self.engine.node_id().to_string(),
            boot_id: format!("{:08x}", self.engine.boot_id()),
            group: self.config.group.to_string(),
            port: self.config.port,
            uptime_ms: now,
            interfaces: self
                .interfaces
                .iter()
                .map(|interface| InterfaceStatus {
                    name: interface.name.clone().unwrap_or_else(|| "*".to_owned()),
                    index: interface.index,
                    up: interface.up,
                    joined: interface.joined,
                })
                .collect(),
            socket_open: self.socket.is_some(),
            keyed: self.engine.is_keyed(),
            key_state: if self.engine.is_keyed() {
                "keyed"
            } else {
                "open"
            },
            keys: self
                .config
                .keys
                .iter()
                .map(|key| KeyStatus {
                    id: key.id(),
                    fingerprint: crate::hex::encode(&key.fingerprint()),
                })
                .collect(),
            other_key: OtherKeyStatus {
                senders: other_key.len(),
                datagrams: other_key.iter().map(|(_, sender)| sender.datagrams).sum(),
                addresses: other_key
                    .iter()
                    .map(|(address, _)| address.to_string())
                    .collect(),
            },
            peers: self
                .engine
                .peers()
                .iter()
                .map(|(id, peer)| PeerStatus {
                    node_id: id.to_string(),
                    last_heard_ms_ago: now.saturating_sub(peer.last_heard),
                    in_sync: peer.last_digest == Some(our_digest),
                    digest: peer.last_digest.map(|digest| format!("{digest:016x}")),
                })
                .collect(),
            digest: format!("{our_digest:016x}"),
            entries: store.len(),
            live_entries: store
                .iter()
                .filter(|(_, entry)| !entry.is_tombstone())
                .count(),
            store_bytes: store.bytes(),
            limits: LimitsStatus {
                max_entries: limits.entries_max,
                max_store_bytes: limits.store_bytes_max,
                tombstone_lifetime_s: limits.tombstone_ttl_ms / 1000,
            },
            clock: self.engine.clock_high_water().0,
            state_dir: self
                .state
                .as_ref()
                .map(|state| state.path().display().to_string()),
            persist: PersistStatus {
                ok: self.persist_error.is_none(),
                error: self.persist_error.clone(),
                unsaved_changes: self.unsaved_changes(),
            },
            last_change: self.recent_changes.front().map(change),
            recent_changes: self.recent_changes.iter().map(change).collect(),
            counters: CountersStatus {
                datagrams_sent: engine_counters.datagrams_sent,
                bytes_sent: engine_counters.bytes_sent,
                datagrams_received: engine_counters.datagrams_received,
                bytes_received: engine_counters.bytes_received,
                summaries_sent: engine_counters.summaries_sent,
                pushes_sent: engine_counters.pushes_sent,
                repairs_sent: engine_counters.repairs_sent,
                fragments_sent: engine_counters.fragments_sent,
                bucket_digests_sent: engine_counters.bucket_digests_sent,
                entries_applied: engine_counters.entries_applied,
                entries_stale: engine_counters.entries_stale,
                socket_rebuilds: engine_counters.socket_rebuilds,
                node_id_clashes: engine_counters.node_id_clashes,
                // Two reasons may share a name ("truncated"): summed.
                dropped: engine_counters.dropped.iter().fold(
                    BTreeMap::new(),
                    |mut dropped, (reason, count)| {
                        *dropped.entry(reason.name()).or_default() += count;
                        dropped
                    },
                ),
                driver: c.clone(),
            },
            control: None,
        }
    }
}

/// The status object (`gwsync status --json`, `gwsync_status`, ubus
/// `status`): its shape is defined here once.
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub node_id: String,
    pub boot_id: String,
    pub group: String,
    pub port: u16,
    pub uptime_ms: u64,
    pub interfaces: Vec<InterfaceStatus>,
    pub socket_open: bool,
    pub keyed: bool,
    /// "keyed" or "open".
    pub key_state: &'static str,
    /// The keys in use, the sending one first, named by id and fingerprint.
    pub keys: Vec<KeyStatus>,
    pub other_key: OtherKeyStatus,
    pub peers: Vec<PeerStatus>,
    pub digest: String,
    pub entries: usize,
    pub live_entries: usize,
    pub store_bytes: usize,
    pub limits: LimitsStatus,
    pub clock: u64,
    pub state_dir: Option<String>,
    pub persist: PersistStatus,
    pub last_change: Option<ChangeStatus>,
    pub recent_changes: Vec<ChangeStatus>,
    pub counters: CountersStatus,
    /// The control socket's counters, added by the daemon.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<Value>,
}

impl Status {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[derive(Debug, Serialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub index: Option<u32>,
    pub up: bool,
    pub joined: bool,
}

#[derive(Debug, Serialize)]
pub struct KeyStatus {
    pub id: u8,
    pub fingerprint: String,
}

/// Datagrams heard within [`OTHER_KEY_RECENT_MS`] that no key of ours opens.
#[derive(Debug, Serialize)]
pub struct OtherKeyStatus {
    pub senders: usize,
    pub datagrams: u64,
    pub addresses: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PeerStatus {
    pub node_id: String,
    pub last_heard_ms_ago: u64,
    /// Its last announced summary digest equals ours.
    pub in_sync: bool,
    /// Its last announced summary digest; null until one was heard.
    pub digest: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LimitsStatus {
    pub max_entries: usize,
    pub max_store_bytes: usize,
    pub tombstone_lifetime_s: u64,
}

#[derive(Debug, Serialize)]
pub struct PersistStatus {
    pub ok: bool,
    pub error: Option<String>,
    pub unsaved_changes: u64,
}

#[derive(Debug, Serialize)]
pub struct ChangeStatus {
    pub key: String,
    pub origin: String,
    pub ms_ago: u64,
    pub deleted: bool,
}

#[derive(Debug, Serialize)]
pub struct CountersStatus {
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub datagrams_received: u64,
    pub bytes_received: u64,
    pub summaries_sent: u64,
    pub pushes_sent: u64,
    pub repairs_sent: u64,
    pub fragments_sent: u64,
    pub bucket_digests_sent: u64,
    pub entries_applied: u64,
    pub entries_stale: u64,
    pub socket_rebuilds: u64,
    pub node_id_clashes: u64,
    pub dropped: BTreeMap<&'static str, u64>,
    #[serde(flatten)]
    pub driver: DriverCounters,
}

impl AsFd for Driver {
    /// The same fd as [`Driver::fd`], borrowed, for poll loops in Rust.
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            log::error!("closing: {error}");
        }
    }
}

/// Reads a key file (1 or 2 keys, see [`crypto::parse_keys`]); a file
/// others may read still works and is logged as a warning.
pub fn read_key_file(path: &std::path::Path) -> Result<Vec<GroupKey>, crypto::KeyFileError> {
    let (keys, warning) = crypto::load_key_file(path)?;
    if let Some(warning) = warning {
        log::warn!("key file {}: {warning}", path.display());
    }
    Ok(keys)
}

/// "id 17 (fingerprint 0011..) sends, id 4 (..) accepted": names keys in
/// logs without showing them.
fn describe_keys(keys: &[GroupKey]) -> String {
    keys.iter()
        .enumerate()
        .map(|(index, key)| {
            format!(
                "id {} fingerprint {} {}",
                key.id(),
                crate::hex::encode(&key.fingerprint()),
                if index == 0 { "(sends)" } else { "(accepted)" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A stored value as it goes out in JSON: embedded as it is when it is
/// JSON (member order and number spelling kept), else as a JSON string of
/// its (lossy) text.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum StoredValue<'a> {
    Json(&'a RawValue),
    Text(String),
}

impl<'a> StoredValue<'a> {
    pub fn of(bytes: &'a [u8]) -> StoredValue<'a> {
        match serde_json::from_slice::<&RawValue>(bytes) {
            Ok(raw) => StoredValue::Json(raw),
            Err(_) => StoredValue::Text(String::from_utf8_lossy(bytes).into_owned()),
        }
    }
}

/// Validates one JSON value and removes insignificant whitespace, keeping
/// everything else (member order, number spelling) exactly as written.
pub fn compact_json(text: &str) -> Result<String, String> {
    serde_json::from_str::<CheckedJson>(text).map_err(|error| error.to_string())?;
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for ch in text.chars() {
        if in_string {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
        } else if ch == '"' {
            in_string = true;
            out.push(ch);
        } else if !ch.is_ascii_whitespace() {
            out.push(ch);
        }
    }
    Ok(out)
}

/// A JSON value read in full and kept nowhere: every string is decoded,
/// so a lone surrogate escape (`"\udc00"`) is refused as it would be by
/// the strict readers on other gateways and our own state file loader,
/// which serde's `IgnoredAny` lets through. Reading into a
/// `serde_json::Value` checks the same but builds a tree, an allocation
/// per member, for each write. Nesting is bounded by serde_json's depth
/// limit.
struct CheckedJson;

impl<'de> serde::Deserialize<'de> for CheckedJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<CheckedJson, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};

        struct CheckedVisitor;
        impl<'de> Visitor<'de> for CheckedVisitor {
            type Value = CheckedJson;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_i64<E>(self, _: i64) -> Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_u64<E>(self, _: u64) -> Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_f64<E>(self, _: f64) -> Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_str<E>(self, _: &str) -> Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_unit<E>(self) -> Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<CheckedJson, A::Error> {
                while items.next_element::<CheckedJson>()?.is_some() {}
                Ok(CheckedJson)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<CheckedJson, A::Error> {
                while members.next_entry::<CheckedJson, CheckedJson>()?.is_some() {}
                Ok(CheckedJson)
            }
        }
        deserializer.deserialize_any(CheckedVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_json_keeps_strings_and_order_and_rejects_garbage() {
        assert_eq!(
            compact_json(" { \"b\" : 1 , \"a\" : \"x y \\\" z\" } ").unwrap(),
            r#"{"b":1,"a":"x y \" z"}"#
        );
        assert_eq!(compact_json("1.50").unwrap(), "1.50");
        assert!(compact_json("{").is_err());
        assert!(compact_json("1 2").is_err());
        assert!(compact_json("").is_err());
    }

    #[test]
    fn a_change_keeps_its_text_and_shows_a_peers_invalid_bytes_lossily() {
        let change = ChangeEvent::new(
            "k".into(),
            Some(Box::from(&b"{\"a\":\"\xc3\xa9\"}"[..])),
            NodeId(1),
        );
        assert_eq!(change.value.as_deref(), Some("{\"a\":\"\u{e9}\"}"));
        let change = ChangeEvent::new("k".into(), Some(Box::from(&b"\"\xff\""[..])), NodeId(1));
        assert_eq!(change.value.as_deref(), Some("\"\u{fffd}\""));
        assert_eq!(ChangeEvent::new("k".into(), None, NodeId(1)).value, None);
    }

    #[test]
    fn compact_json_refuses_what_a_strict_reader_would_anywhere_in_the_value() {
        for lone_surrogate in [
            r#""\udc00""#,
            r#"[1, {"a": ["\ud800"]}]"#,
            r#"{"\udc00": 1}"#,
        ] {
            // Refused, and for the reason a full parse gives.
            let refused = compact_json(lone_surrogate).unwrap_err();
            let parsed = serde_json::from_str::<Value>(lone_surrogate).unwrap_err();
            assert_eq!(refused, parsed.to_string(), "{lone_surrogate}");
        }
        assert!(compact_json("1e400").is_err(), "a number out of range");
        assert!(compact_json(r#"{"a":1,}"#).is_err(), "a trailing comma");
        // Nesting: as deep as serde_json reads, and no deeper.
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(compact_json(&nested(100)).unwrap(), nested(100));
        let too_deep = compact_json(&nested(100_000)).unwrap_err();
        assert!(too_deep.contains("recursion limit"), "{too_deep}");
        let escaped_pair = r#"{"k": "\ud83d\ude00 \u0041", "n": [true, false, null, -1, 2.5]}"#;
        assert_eq!(
            compact_json(escaped_pair).unwrap(),
            r#"{"k":"\ud83d\ude00 \u0041","n":[true,false,null,-1,2.5]}"#
        );
    }
}
