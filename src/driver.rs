//! Runs one [`Engine`] over a real multicast socket and the real clock.
//!
//! The driver is the engine's I/O half (the boringtun device loop to the
//! engine's noise core): it owns the socket, the interface watch, the clock
//! and the state directory, and it follows the engine's manual exactly:
//! input, then drain `poll_transmit` and `poll_event`, then persist, then
//! wait for the fd or the deadline.
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
//! so a caller registers it once.
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

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::crypto::{GroupKey, Keyring};
use crate::engine::{self, Engine, Event, NodeId, TriggerReason, WriteError};
use crate::net::{self, GroupSocket, LinkWatch, Received};
use crate::persist::{self, Debounce, Loaded, StateDir};

/// Receive buffer: the largest UDP payload, so nothing a peer can send is
/// cut silently (longer datagrams do not exist; shorter ones are counted
/// as truncated only if the kernel says so).
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Datagrams taken per [`Driver::process`] call, so one call stays short
/// and a flood cannot starve the control socket. The fd stays readable.
const DATAGRAMS_PER_PROCESS_MAX: usize = 256;
/// Change events kept for [`Driver::poll_change`] when nobody drains them.
const CHANGES_QUEUED_MAX: usize = 65_536;
/// Retry period for interfaces that are missing or failed to join, and for
/// a socket that failed to open.
const RETRY_INTERVAL_MS: u64 = 3_000;

/// How to run a driver. Every field has a default.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Interfaces to join by name; empty: the kernel's choice (index 0).
    pub interfaces: Vec<String>,
    pub group: IpAddr,
    pub port: u16,
    /// Where the node id and state live; `None`: memory only.
    pub state_dir: Option<PathBuf>,
    /// The group key (32 bytes): every datagram is sealed and checked with it.
    pub key: Option<[u8; 32]>,
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
            key: None,
            node_id: None,
            engine: engine::Config::default(),
            persist_interval_ms: 2_000,
        }
    }
}

/// Why [`Driver::open`] failed.
#[derive(Debug)]
pub enum OpenError {
    /// The state directory could not be created or written.
    State(persist::PersistError),
    /// The epoll fd could not be created.
    Poll(io::Error),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
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
}

impl fmt::Display for SetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetError::InvalidJson(message) => write!(f, "value is not valid JSON: {message}"),
            SetError::Write(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for SetError {}

/// An entry changed, by a local write or from the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeEvent {
    pub key: String,
    /// The new value as JSON text; `None` when the key was deleted.
    pub value: Option<String>,
    pub origin: NodeId,
}

/// Receives change events instead of the queue (see [`Driver::on_change`]).
pub type ChangeCallback = Box<dyn FnMut(&ChangeEvent) + Send>;

/// I/O counters, next to the engine's own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriverCounters {
    pub recv_errors: u64,
    pub recv_truncated: u64,
    pub recv_interrupted: u64,
    pub send_errors: u64,
    pub send_no_buffers: u64,
    pub socket_opens: u64,
    pub socket_open_errors: u64,
    pub join_errors: u64,
    pub state_writes: u64,
    pub state_write_errors: u64,
    pub changes_dropped: u64,
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
    on_change: Option<ChangeCallback>,
    counters: DriverCounters,
    recv_buffer: Vec<u8>,
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
        match config.key {
            Some(key) => {
                let keyring = Keyring::new(&GroupKey::from_bytes(key));
                engine.set_keyring(Some(keyring), StdRng::from_os_rng());
            }
            None => log::warn!("no group key: datagrams are neither authenticated nor encrypted"),
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
            on_change: None,
            counters: DriverCounters::default(),
            recv_buffer: vec![0; RECV_BUFFER_BYTES],
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
                deadline = deadline.min(due);
            }
        }
        if let Some(due) = self.retry_due {
            deadline = deadline.min(due);
        }
        deadline
    }

    /// Does everything that is ready, without blocking: receives pending
    /// datagrams, handles interface changes, runs due timers, sends, and
    /// writes the state when the debounce allows.
    pub fn process(&mut self) {
        if self.link_watch.as_ref().is_some_and(LinkWatch::drain) {
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
        self.receive();
        let now = self.now();
        self.engine.set_wall_clock(now, Self::wall_ms());
        if self.engine.poll_timeout() <= now {
            self.engine.handle_timeout(now);
        }
        self.flush_transmits();
        self.maybe_persist(false);
    }

    fn receive(&mut self) {
        let Some(socket) = &self.socket else { return };
        let mut taken = 0;
        while taken < DATAGRAMS_PER_PROCESS_MAX {
            match socket.recv(&mut self.recv_buffer) {
                Ok(Received::Datagram(len)) => {
                    taken += 1;
                    let now = self.start.elapsed().as_millis() as u64;
                    self.engine.set_wall_clock(now, Self::wall_ms());
                    self.engine.handle_datagram(now, &self.recv_buffer[..len]);
                }
                Ok(Received::Truncated(len)) => {
                    taken += 1;
                    self.counters.recv_truncated += 1;
                    if worth_logging(self.counters.recv_truncated) {
                        log::warn!("dropped a {len}-byte datagram: larger than the receive buffer");
                    }
                }
                Ok(Received::Empty) => break,
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
        // Applying datagrams may have produced answers and events.
        self.drain_events();
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
                    let value = value.map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
                    let change = ChangeEvent { key, value, origin };
                    log::debug!("changed {} (origin {})", change.key, change.origin);
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
            }
            Err(error) => {
                self.counters.state_write_errors += 1;
                // Try again after one interval, not in a tight loop.
                self.debounce.written(now, generation.wrapping_sub(1));
                if worth_logging(self.counters.state_write_errors) {
                    log::error!("could not save state: {error}");
                }
            }
        }
    }

    /// Writes pending state now, whatever the debounce says (SIGTERM, close).
    pub fn flush(&mut self) {
        self.maybe_persist(true);
    }

    /// Writes a JSON value. The text is validated and stored compact.
    pub fn set(&mut self, key: &str, value_json: &str) -> Result<(), SetError> {
        let compact = compact_json(value_json).map_err(SetError::InvalidJson)?;
        let now = self.now();
        self.engine
            .set(now, Self::wall_ms(), key, compact.as_bytes())
            .map_err(SetError::Write)?;
        self.drain_events();
        Ok(())
    }

    /// Deletes a key; [`WriteError::NotFound`] when it holds no value.
    pub fn delete(&mut self, key: &str) -> Result<(), SetError> {
        let now = self.now();
        self.engine
            .delete(now, Self::wall_ms(), key)
            .map_err(SetError::Write)?;
        self.drain_events();
        Ok(())
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
        let mut entries: Vec<(&str, &[u8])> = self
            .engine
            .store()
            .iter()
            .filter_map(|(key, entry)| entry.value.map(|value| (key, value)))
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut out = String::from("{");
        for (index, (key, value)) in entries.into_iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            out.push_str(&Value::from(key).to_string());
            out.push(':');
            push_json(&mut out, value);
        }
        out.push('}');
        out
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

    /// Everything `gwsync status` shows, as JSON.
    pub fn status(&self) -> Value {
        let now = self.now();
        let engine_counters = self.engine.counters();
        let dropped: serde_json::Map<String, Value> = engine_counters
            .dropped
            .iter()
            .map(|(reason, count)| (reason.name().to_owned(), json!(count)))
            .collect();
        let peers: Vec<Value> = self
            .engine
            .peers()
            .iter()
            .map(|(id, peer)| {
                json!({
                    "node_id": id.to_string(),
                    "last_heard_ms_ago": now.saturating_sub(peer.last_heard),
                })
            })
            .collect();
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|interface| {
                json!({
                    "name": interface.name.as_deref().unwrap_or("*"),
                    "index": interface.index,
                    "up": interface.up,
                    "joined": interface.joined,
                })
            })
            .collect();
        let store = self.engine.store();
        let c = &self.counters;
        let counters = json!({
                "datagrams_sent": engine_counters.datagrams_sent,
            "bytes_sent": engine_counters.bytes_sent,
            "datagrams_received": engine_counters.datagrams_received,
            "bytes_received": engine_counters.bytes_received,
            "summaries_sent": engine_counters.summaries_sent,
            "pushes_sent": engine_counters.pushes_sent,
            "repairs_sent": engine_counters.repairs_sent,
            "fragments_sent": engine_counters.fragments_sent,
            "bucket_digests_sent": engine_counters.bucket_digests_sent,
            "entries_applied": engine_counters.entries_applied,
            "entries_stale": engine_counters.entries_stale,
            "socket_rebuilds": engine_counters.socket_rebuilds,
            "node_id_clashes": engine_counters.node_id_clashes,
            "dropped": dropped,
            "recv_errors": c.recv_errors,
            "recv_truncated": c.recv_truncated,
            "recv_interrupted": c.recv_interrupted,
            "send_errors": c.send_errors,
            "send_no_buffers": c.send_no_buffers,
            "socket_opens": c.socket_opens,
            "socket_open_errors": c.socket_open_errors,
            "join_errors": c.join_errors,
            "state_writes": c.state_writes,
            "state_write_errors": c.state_write_errors,
            "changes_dropped": c.changes_dropped,
        });
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "node_id": self.engine.node_id().to_string(),
            "boot_id": format!("{:08x}", self.engine.boot_id()),
            "group": self.config.group.to_string(),
            "port": self.config.port,
            "uptime_ms": now,
            "interfaces": interfaces,
            "socket_open": self.socket.is_some(),
            "keyed": self.engine.is_keyed(),
            "peers": peers,
            "digest": format!("{:016x}", store.digest()),
            "entries": store.len(),
            "live_entries": store.iter().filter(|(_, entry)| !entry.is_tombstone()).count(),
            "store_bytes": store.bytes(),
            "clock": self.engine.clock_high_water().0,
            "state_dir": self.state.as_ref().map(|state| state.path().display().to_string()),
            "counters": counters,
        })
    }
}

impl AsFd for Driver {
    /// The same fd as [`Driver::fd`], borrowed, for poll loops in Rust.
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Appends a stored value as JSON: as it is when it is JSON, else as a
/// JSON string of its (lossy) text.
pub fn push_json(out: &mut String, value: &[u8]) {
    if persist::is_json(value) {
        out.push_str(&String::from_utf8_lossy(value));
    } else {
        out.push_str(&Value::from(String::from_utf8_lossy(value)).to_string());
    }
}

/// Validates one JSON value and removes insignificant whitespace, keeping
/// everything else (member order, number spelling) exactly as written.
pub fn compact_json(text: &str) -> Result<String, String> {
    // A full parse, not just a syntax check: it also refuses lone surrogate
    // escapes (`"\udc00"`), which strict JSON readers on other gateways and
    // our own state file loader would choke on.
    serde_json::from_str::<serde_json::Value>(text).map_err(|error| error.to_string())?;
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
}
