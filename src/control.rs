//! The local control socket between the daemon and the CLI.
//!
//! A Unix stream socket, mode 0600 (only its owner, root on a router, may
//! change the shared data). One JSON object per line each way; replies come
//! in request order.
//!
//! ```text
//! {"op":"get","key":"home/1"}           {"ok":true,"value":<JSON>}
//! {"op":"set","key":"home/1","value":<JSON>}   {"ok":true}
//! {"op":"del","key":"home/1"}           {"ok":true}
//! {"op":"list","prefix":"home/"}        {"ok":true,"keys":["home/1",...]}
//! {"op":"dump"}                         {"ok":true,"data":{"home/1":<JSON>,...}}
//! {"op":"status"}                       {"ok":true,"status":{...}}
//! {"op":"trigger","reason":"network-up"} {"ok":true}
//! {"op":"load","entries":[{"k":"home/1","v":<JSON>},...]}
//!     {"ok":true,"applied":N,"unchanged":N,"kept_newer":N,"rejected":N,"errors":["..."]}
//! {"op":"reload"}                       {"ok":true,"keys":<1 or 2>}
//! {"op":"watch"}                        {"ok":true} then one line per change:
//!     {"key":"home/1","value":<JSON>,"origin":"<node id>"}
//!     {"key":"home/1","deleted":true,"origin":"<node id>"}
//! ```
//!
//! Errors: `{"ok":false,"error":"<code>","message":"<text>"}` with code one
//! of [`ErrorCode`]'s names. A request naming one field twice is refused
//! (`bad_request`), so no two readers of it can disagree on what it asked.
//!
//! # Limits
//!
//! One local client must not be able to slow the daemon for the others or
//! grow its memory, so every connection is bounded, each limit counted in
//! `status` under `"control"`:
//! - [`REQUEST_BYTES_MAX`]: a longer request line closes the connection
//!   (`requests_too_long`);
//! - [`REQUEST_FIELDS_MAX`]: a request with more fields is refused
//!   (`requests_bad`);
//! - requests are answered one at a time per client: the next request of a
//!   client is read only once its previous reply has left (so a client that
//!   sends thousands of `dump`s and never reads holds one reply, not
//!   thousands);
//! - [`CLIENT_QUEUED_BYTES_MAX`]: a `watch` client whose unsent change
//!   lines pass it is disconnected (`clients_dropped_backlog`);
//! - [`CLIENT_IDLE_MS`]: a client that moved no byte for that long while
//!   it owes us a request, or we owe it a reply it does not read, is closed
//!   (`clients_closed_idle`); a `watch` client with nothing queued is never
//!   idle;
//! - [`CLIENTS_MAX`]: when full, a new client evicts the longest-idle client
//!   that is between requests, else the one stalled longest half-way through
//!   a request (for [`CLIENT_STALLED_REQUEST_MS`]) or a reply (for
//!   [`CLIENT_STALLED_REPLY_MS`]) (`clients_evicted`); only when every client is making progress is the
//!   new one refused (`clients_refused`), logged at most once per
//!   [`REFUSAL_LOG_INTERVAL_MS`] with the count.
//!
//! Values are embedded as JSON (not as strings) so the socket is pleasant
//! to use with `socat`; the daemon still takes them as raw text, so member
//! order and number spelling survive exactly.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::driver::{ChangeEvent, Driver, SetError, Status, StoredValue};
use crate::engine::{TriggerReason, WriteError};

/// A request line longer than this closes the connection; it is well above
/// the largest value (64 KiB) so any valid `set` fits.
pub const REQUEST_BYTES_MAX: usize = 1024 * 1024;
/// Fields one request may name. No op takes more than three; the bound
/// keeps the check that no field is named twice linear in the line.
pub const REQUEST_FIELDS_MAX: usize = 16;
/// Unsent bytes a `watch` client may have queued before it is dropped, so
/// the daemon's memory stays bounded.
pub const CLIENT_QUEUED_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Milliseconds without a byte moving after which a client that is in the
/// middle of a request or not reading its reply is closed.
pub const CLIENT_IDLE_MS: u64 = 10_000;
/// Connections served at once.
pub const CLIENTS_MAX: usize = 32;
/// When full, a client that sent part of a request and then nothing for
/// this many milliseconds may be evicted for a new one (the CLI sends a
/// request in one write; a local socket does not pause mid-line).
pub const CLIENT_STALLED_REQUEST_MS: u64 = 50;
/// When full, a client that has not read its reply for this many
/// milliseconds may be evicted for a new one.
pub const CLIENT_STALLED_REPLY_MS: u64 = 1_000;
/// Connections accepted per [`ControlServer::process`] call, so a connect
/// storm cannot keep the daemon in its accept loop; the rest wait in the
/// kernel's backlog.
pub const ACCEPTS_PER_PROCESS_MAX: usize = 64;
/// At most one "refused a client" log line per this many milliseconds.
pub const REFUSAL_LOG_INTERVAL_MS: u64 = 10_000;
/// Bytes taken from a client per read. One buffer serves every client:
/// zeroing a fresh one for each client on each wake cost a receiving
/// gateway more than reading its datagram.
const CLIENT_READ_BYTES: usize = 16 * 1024;

/// Error codes of the protocol, and the one mapping of a failed write to
/// them (and from them to CLI exit codes; the C API maps them in ffi.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The key holds no value.
    NotFound,
    /// The value is not one JSON value.
    InvalidJson,
    /// The key is empty or too long.
    InvalidKey,
    /// The value is over the value size limit.
    TooLarge,
    /// The store is at its entry or byte limit.
    StoreFull,
    /// The write was applied and sent, but the state cannot be saved.
    NotPersisted,
    /// `reload` could not read the key file; the keys in use stay.
    ReloadFailed,
    /// The request is not understood.
    BadRequest,
    /// The key holds the largest possible version; no write can be newer.
    VersionExhausted,
}

impl ErrorCode {
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidKey => "invalid_key",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::StoreFull => "store_full",
            ErrorCode::NotPersisted => "not_persisted",
            ErrorCode::ReloadFailed => "reload_failed",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::VersionExhausted => "version_exhausted",
        }
    }

    /// The code a reply's `"error"` names; `None` for a name this build
    /// does not know (a newer daemon).
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        [
            ErrorCode::NotFound,
            ErrorCode::InvalidJson,
            ErrorCode::InvalidKey,
            ErrorCode::TooLarge,
            ErrorCode::StoreFull,
            ErrorCode::NotPersisted,
            ErrorCode::ReloadFailed,
            ErrorCode::BadRequest,
            ErrorCode::VersionExhausted,
        ]
        .into_iter()
        .find(|code| code.name() == name)
    }

    /// The CLI's exit code: 3 key not found, 1 any other error.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorCode::NotFound => 3,
            _ => 1,
        }
    }
}

impl From<&SetError> for ErrorCode {
    fn from(error: &SetError) -> ErrorCode {
        match error {
            SetError::InvalidJson(_) => ErrorCode::InvalidJson,
            SetError::Write(WriteError::InvalidKey) => ErrorCode::InvalidKey,
            SetError::Write(WriteError::ValueTooLarge) => ErrorCode::TooLarge,
            SetError::Write(WriteError::StoreFull) => ErrorCode::StoreFull,
            SetError::Write(WriteError::NotFound) => ErrorCode::NotFound,
            SetError::Write(WriteError::VersionExhausted) => ErrorCode::VersionExhausted,
            SetError::NotPersisted(_) => ErrorCode::NotPersisted,
        }
    }
}

/// Why the control socket could not be served.
#[derive(Debug)]
pub enum ControlError {
    /// Another daemon answers on this path.
    InUse(PathBuf),
    /// The socket's directory is missing or unsafe.
    Dir(PathBuf, String),
    /// The socket could not be bound.
    Bind(PathBuf, io::Error),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::InUse(path) => {
                write!(f, "a daemon is already serving {}", path.display())
            }
            ControlError::Dir(path, why) => {
                write!(f, "control socket {}: {why}", path.display())
            }
            ControlError::Bind(path, error) => {
                write!(f, "cannot listen on {}: {error}", path.display())
            }
        }
    }
}

impl std::error::Error for ControlError {}

/// Limits hit and clients served, for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ControlCounters {
    pub clients_accepted: u64,
    pub clients_refused: u64,
    pub clients_evicted: u64,
    pub clients_closed_idle: u64,
    pub clients_dropped_backlog: u64,
    pub requests: u64,
    pub requests_bad: u64,
    pub requests_too_long: u64,
}

#[derive(Debug)]
struct Client {
    stream: UnixStream,
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    watching: bool,
    /// Read side finished (EOF or error): close once the outbox is sent.
    done_reading: bool,
    broken: bool,
    /// Poll reported input (or was not asked): only then is a read tried,
    /// as a read that finds nothing costs a system call per client per wake.
    readable: bool,
    /// When a byte last moved either way (ms since the server started).
    last_progress_ms: u64,
}

impl Client {
    /// A whole request read and its turn come: the previous reply has left.
    fn has_request_to_answer(&self) -> bool {
        !self.broken && self.outbox.is_empty() && self.inbox.contains(&b'\n')
    }

    /// Between requests: nothing half-read, nothing owed. Such a client
    /// costs only its fd and may be evicted for a new one.
    fn is_idle(&self) -> bool {
        !self.watching && self.inbox.is_empty() && self.outbox.is_empty()
    }

    /// Whether it waits on the other side (a request to finish, a reply to
    /// be read); a watcher with nothing queued waits on us.
    fn may_time_out(&self) -> bool {
        !(self.watching && self.outbox.is_empty())
    }
}

/// The daemon's side of the control socket.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    clients: Vec<Client>,
    read_buffer: Box<[u8]>,
    start: Instant,
    counters: ControlCounters,
    refusals_unlogged: u64,
    refusal_logged_at: Option<u64>,
}

impl ControlServer {
    /// Listens on `path`, mode 0600. A stale socket file left by a crashed
    /// daemon is replaced; a live one is an error. The directory must exist
    /// (it is never created silently) and must not be writable by other
    /// users (a sticky directory such as /tmp is accepted: others cannot
    /// replace our socket there, and the CLI checks the socket's owner).
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            return Err(ControlError::Dir(
                path.to_owned(),
                format!(
                    "the directory {} does not exist; create it or choose another --socket",
                    parent.display()
                ),
            ));
        }
        crate::persist::check_dir_not_writable_by_others(parent, true)
            .map_err(|why| ControlError::Dir(path.to_owned(), why))?;
        if std::fs::symlink_metadata(path).is_ok() {
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        // The umask makes the socket 0600 from its first moment, with no
        // window in which another user could connect.
        let old_mask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old_mask);
        let listener = bound.map_err(|error| ControlError::Bind(path.to_owned(), error))?;
        listener
            .set_nonblocking(true)
            .map_err(|error| ControlError::Bind(path.to_owned(), error))?;
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
            clients: Vec::new(),
            read_buffer: vec![0; CLIENT_READ_BYTES].into_boxed_slice(),
            start: Instant::now(),
            counters: ControlCounters::default(),
            refusals_unlogged: 0,
            refusal_logged_at: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn counters(&self) -> &ControlCounters {
        &self.counters
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The fds to poll: the listener (readable) and every client, with
    /// whether to poll it for readable (it may send its next request) and
    /// writable (output is waiting).
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, bool, bool)> {
        let mut fds = vec![(self.listener.as_fd(), true, false)];
        fds.extend(self.clients.iter().map(|client| {
            (
                client.stream.as_fd(),
                !client.done_reading && client.outbox.is_empty(),
                !client.outbox.is_empty(),
            )
        }));
        fds
    }

    /// Milliseconds until a client may time out, so the daemon's poll
    /// wakes for it, or 0 when a pipelined request is waiting (its bytes
    /// were read with an earlier one, so poll would not wake for it);
    /// `None` when nothing is due.
    pub fn timeout_ms(&self) -> Option<u64> {
        if self.clients.iter().any(Client::has_request_to_answer) {
            return Some(0);
        }
        let now = self.now();
        self.clients
            .iter()
            .filter(|client| client.may_time_out())
            .map(|client| (client.last_progress_ms + CLIENT_IDLE_MS).saturating_sub(now))
            .min()
    }

    /// Accepts, reads, answers and writes whatever is ready; never blocks.
    /// `ready` says, for each fd of the last [`ControlServer::poll_fds`] in
    /// order, whether poll returned an event for it; fds past its end count
    /// as ready.
    pub fn process(&mut self, driver: &mut Driver, ready: &[bool]) {
        let now = self.now();
        let mut ready = ready.iter().copied().chain(std::iter::repeat(true));
        let listener_ready = ready.next().unwrap_or(true);
        for client in &mut self.clients {
            client.readable = ready.next().unwrap_or(true);
        }
        let accepts = if listener_ready {
            ACCEPTS_PER_PROCESS_MAX
        } else {
            0
        };
        for _ in 0..accepts {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= CLIENTS_MAX {
                        // Before choosing whom to evict or refuse, answer
                        // what is waiting and reap clients that hung up (a
                        // connect storm), so no pending request is lost.
                        self.service(driver, now);
                    }
                    self.admit(stream, now);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    log::warn!("control socket accept: {error}");
                    break;
                }
            }
        }
        self.service(driver, now);
        for client in &mut self.clients {
            if !client.broken
                && client.may_time_out()
                && now.saturating_sub(client.last_progress_ms) >= CLIENT_IDLE_MS
            {
                client.broken = true;
                self.counters.clients_closed_idle += 1;
            }
        }
        self.clients
            .retain(|client| !(client.broken || client.done_reading && client.outbox.is_empty()));
        self.log_refusals(now);
    }

    /// Reads, answers and writes for every client; drops those finished.
    fn service(&mut self, driver: &mut Driver, now: u64) {
        for client in &mut self.clients {
            client.read(driver, now, &mut self.counters, &mut self.read_buffer);
            client.write(now);
        }
        self.clients
            .retain(|client| !(client.broken || client.done_reading && client.outbox.is_empty()));
    }

    fn admit(&mut self, stream: UnixStream, now: u64) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        if self.clients.len() >= CLIENTS_MAX {
            // Idle clients go first, then clients stalled half-way (a
            // request never finished, a reply not read) for a while; a
            // client that is making progress is never pushed out.
            let longest_waiting = |stalled: bool| {
                self.clients
                    .iter()
                    .enumerate()
                    .filter(|(_, client)| {
                        if stalled {
                            let quiet = now.saturating_sub(client.last_progress_ms);
                            if !client.outbox.is_empty() {
                                quiet >= CLIENT_STALLED_REPLY_MS
                            } else {
                                !client.inbox.is_empty() && quiet >= CLIENT_STALLED_REQUEST_MS
                            }
                        } else {
                            client.is_idle()
                        }
                    })
                    .min_by_key(|(_, client)| client.last_progress_ms)
                    .map(|(index, _)| index)
            };
            let idlest = longest_waiting(false).or_else(|| longest_waiting(true));
            match idlest {
                Some(index) => {
                    self.clients.swap_remove(index);
                    self.counters.clients_evicted += 1;
                }
                None => {
                    self.counters.clients_refused += 1;
                    self.refusals_unlogged += 1;
                    return;
                }
            }
        }
        self.counters.clients_accepted += 1;
        self.clients.push(Client {
            stream,
            inbox: Vec::new(),
            outbox: Vec::new(),
            watching: false,
            done_reading: false,
            broken: false,
            readable: true,
            last_progress_ms: now,
        });
    }

    fn log_refusals(&mut self, now: u64) {
        if self.refusals_unlogged == 0 {
            return;
        }
        let due = self
            .refusal_logged_at
            .is_none_or(|at| now.saturating_sub(at) >= REFUSAL_LOG_INTERVAL_MS);
        if due {
            log::warn!(
                "control socket: {} busy clients connected (the limit); refused {} new \
                 client(s) since the last such message",
                CLIENTS_MAX,
                self.refusals_unlogged
            );
            self.refusals_unlogged = 0;
            self.refusal_logged_at = Some(now);
        }
    }

    /// Sends a change to every `watch` client.
    pub fn broadcast(&mut self, change: &ChangeEvent) {
        let line = change_line(change);
        for client in self.clients.iter_mut().filter(|client| client.watching) {
            client.outbox.extend_from_slice(line.as_bytes());
            if client.outbox.len() > CLIENT_QUEUED_BYTES_MAX && !client.broken {
                log::warn!(
                    "control socket: a watch client fell {CLIENT_QUEUED_BYTES_MAX} bytes behind; \
                     dropping it"
                );
                client.broken = true;
                self.counters.clients_dropped_backlog += 1;
            }
        }
    }

    /// Writes what is pending without blocking (after a broadcast).
    pub fn flush(&mut self) {
        let now = self.now();
        for client in &mut self.clients {
            client.write(now);
        }
        self.clients.retain(|client| !client.broken);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Client {
    fn read(
        &mut self,
        driver: &mut Driver,
        now: u64,
        counters: &mut ControlCounters,
        buf: &mut [u8],
    ) {
        // One request at a time: the next is taken only once the reply to
        // the previous one has left.
        while self.outbox.is_empty() && !self.broken {
            if let Some(end) = self.inbox.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = self.inbox.drain(..=end).collect();
                counters.requests += 1;
                let reply = self.answer(driver, &line[..end], counters);
                self.outbox.extend_from_slice(reply.as_bytes());
                self.outbox.push(b'\n');
                continue;
            }
            if self.inbox.len() > REQUEST_BYTES_MAX {
                counters.requests_too_long += 1;
                let reply = error_reply(ErrorCode::BadRequest, "request line too long");
                self.outbox.extend_from_slice(reply.as_bytes());
                self.outbox.push(b'\n');
                self.inbox.clear();
                self.done_reading = true;
                break;
            }
            if self.done_reading || !self.readable {
                break;
            }
            if self.inbox.is_empty() {
                match self.answer_peeked(driver, now, counters, buf) {
                    Peeked::Answered => continue,
                    Peeked::NoWholeLine => {}
                    Peeked::Nothing => break,
                }
            }
            match self.stream.read(buf) {
                Ok(0) => self.done_reading = true,
                Ok(len) => {
                    self.last_progress_ms = now;
                    self.inbox.extend_from_slice(&buf[..len]);
                    // A short read emptied the socket; poll tells when more
                    // arrives, so no read is spent to learn there is none.
                    self.readable = len == buf.len();
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    break;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => self.broken = true,
            }
        }
    }

    /// Answers a request that sits whole at the front of the socket before
    /// taking its bytes. Taking them frees the client's send buffer, which
    /// wakes a client blocked reading the reply; on a small CPU that wake
    /// preempted the daemon before a write's push had left (the push is
    /// what every other gateway waits for).
    fn answer_peeked(
        &mut self,
        driver: &mut Driver,
        now: u64,
        counters: &mut ControlCounters,
        buf: &mut [u8],
    ) -> Peeked {
        let peeked = loop {
            match socket::recv(
                self.stream.as_raw_fd(),
                buf,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            ) {
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    self.readable = false;
                    return Peeked::Nothing;
                }
                // EOF and errors are the plain read's to report.
                Ok(0) | Err(_) => return Peeked::NoWholeLine,
                Ok(len) => break len,
            }
        };
        let Some(end) = buf[..peeked].iter().position(|&byte| byte == b'\n') else {
            return Peeked::NoWholeLine;
        };
        counters.requests += 1;
        self.last_progress_ms = now;
        let reply = self.answer(driver, &buf[..end], counters);
        let mut taken = 0;
        while taken <= end && !self.broken {
            match self.stream.read(&mut buf[taken..=end]) {
                Ok(0) => self.broken = true,
                Ok(len) => taken += len,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                // The peeked bytes are queued for this reader alone.
                Err(_) => self.broken = true,
            }
        }
        self.outbox.extend_from_slice(reply.as_bytes());
        self.outbox.push(b'\n');
        self.readable = peeked > end + 1 || peeked == buf.len();
        Peeked::Answered
    }

    fn write(&mut self, now: u64) {
        while !self.outbox.is_empty() && !self.broken {
            match self.stream.write(&self.outbox) {
                Ok(0) => self.broken = true,
                Ok(len) => {
                    self.last_progress_ms = now;
                    self.outbox.drain(..len);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => self.broken = true,
            }
        }
        if self.outbox.is_empty() && self.outbox.capacity() > 64 * 1024 {
            // A large reply left; do not keep its buffer for an idle client.
            self.outbox = Vec::new();
        }
        // A watcher stays until it hangs up; its EOF means "stop".
    }

    fn answer(
        &mut self,
        driver: &mut Driver,
        line: &[u8],
        counters: &mut ControlCounters,
    ) -> String {
        match handle_request(driver, line, counters) {
            Ok(Answer::Reply(reply)) => reply,
            Ok(Answer::Watch) => {
                self.watching = true;
                ok_reply(OkReply::default())
            }
            Err((code, message)) => {
                if code == ErrorCode::BadRequest {
                    counters.requests_bad += 1;
                }
                error_reply(code, &message)
            }
        }
    }
}

enum Answer {
    Reply(String),
    Watch,
}

enum Peeked {
    Answered,
    /// Nothing whole to answer at the front: take bytes as they come.
    NoWholeLine,
    /// The socket is empty.
    Nothing,
}

/// Every successful reply: `"ok": true` and at most one payload field.
#[derive(Default, Serialize)]
struct OkReply<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<StoredValue<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keys: Option<KeysPayload>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
}

/// `list` answers key names, `reload` how many keys are in use.
#[derive(Serialize)]
#[serde(untagged)]
enum KeysPayload {
    Names(Vec<String>),
    Count(usize),
}

#[derive(Serialize)]
struct Reply<'a, T: Serialize> {
    ok: bool,
    #[serde(flatten)]
    payload: T,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

fn ok_reply(payload: OkReply<'_>) -> String {
    serde_json::to_string(&Reply {
        ok: true,
        payload,
        error: None,
        message: None,
    })
    .unwrap_or_default()
}

fn error_reply(code: ErrorCode, message: &str) -> String {
    serde_json::to_string(&Reply {
        ok: false,
        payload: OkReply::default(),
        error: Some(code.name()),
        message: Some(message),
    })
    .unwrap_or_default()
}

fn write_error(driver: &Driver, key: &str, value: &str, error: SetError) -> (ErrorCode, String) {
    (ErrorCode::from(&error), driver.explain(key, value, &error))
}

/// The fields of one request, each named once, values as raw JSON text,
/// borrowed from the request line: a request is parsed with no copy but of
/// what it keeps (parsing is most of a `set`'s work before its push leaves).
struct Fields<'line>(Vec<(Text<'line>, &'line RawValue)>);

impl<'line> Fields<'line> {
    fn get(&self, name: &str) -> Option<&'line RawValue> {
        self.0
            .iter()
            .find(|(field, _)| field.as_str() == name)
            .map(|&(_, value)| value)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Fields<'de>, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Fields(Vec::with_capacity(4));
                while let Some((name, value)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
                    if fields.get(name.as_str()).is_some() {
                        return Err(de::Error::custom(format!(
                            "field \"{}\" given twice",
                            name.as_str()
                        )));
                    }
                    if fields.0.len() == REQUEST_FIELDS_MAX {
                        return Err(de::Error::custom(format!(
                            "more than {REQUEST_FIELDS_MAX} fields"
                        )));
                    }
                    fields.0.push((name, value));
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// A JSON string, borrowed from the request line unless it had escapes to
/// undo. (serde's own `Cow<str>` always copies.)
enum Text<'line> {
    Borrowed(&'line str),
    Owned(String),
}

impl Text<'_> {
    fn as_str(&self) -> &str {
        match self {
            Text::Borrowed(text) => text,
            Text::Owned(text) => text,
        }
    }

    fn into_string(self) -> String {
        match self {
            Text::Borrowed(text) => text.to_owned(),
            Text::Owned(text) => text,
        }
    }
}

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Text<'de>, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Text<'de>, E> {
                Ok(Text::Borrowed(text))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Text<'de>, E> {
                Ok(Text::Owned(text.to_owned()))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Text<'de>, E> {
                Ok(Text::Owned(text))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// Takes a string field of a request.
fn string_field<'line>(
    fields: &Fields<'line>,
    name: &str,
) -> Result<Option<Text<'line>>, (ErrorCode, String)> {
    match fields.get(name) {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<Text<'line>>(raw.get())
            .map(Some)
            .map_err(|_| {
                (
                    ErrorCode::BadRequest,
                    format!("\"{name}\" must be a string"),
                )
            }),
    }
}

/// One control request, parsed and checked, before it touches the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Get {
        key: String,
    },
    /// `value` is the request's JSON text for the value, unparsed.
    Set {
        key: String,
        value: String,
    },
    Del {
        key: String,
    },
    List {
        prefix: String,
    },
    Dump,
    Status,
    Trigger(TriggerReason),
    Watch,
    /// `entries` is the request's JSON array text, unparsed.
    Load {
        entries: String,
    },
    /// Read the key file again.
    Reload,
}

/// Parses one request line. Untrusted input (any local root process can
/// connect): it never panics and is fuzzed (`fuzz/`, target
/// `control_request`).
pub fn parse_request(line: &[u8]) -> Result<Request, (ErrorCode, String)> {
    // Raw fields, so a value keeps its exact text (and a JSON null value
    // stays distinct from a missing one).
    let fields: Fields = serde_json::from_slice(line).map_err(|error| {
        (
            ErrorCode::BadRequest,
            format!("request is not a JSON object with distinct fields: {error}"),
        )
    })?;
    // Each error text is built only when it is the answer: a request's
    // allocations are most of its parsing cost on a cold daemon.
    let missing = |name: &str| (ErrorCode::BadRequest, format!("missing \"{name}\""));
    let op = string_field(&fields, "op")?.ok_or_else(|| missing("op"))?;
    let key = || {
        string_field(&fields, "key")?
            .map(Text::into_string)
            .ok_or_else(|| missing("key"))
    };
    // The ops, in one table.
    Ok(match op.as_str() {
        "get" => Request::Get { key: key()? },
        "set" => Request::Set {
            key: key()?,
            value: fields
                .get("value")
                .ok_or_else(|| missing("value"))?
                .get()
                .to_owned(),
        },
        "del" => Request::Del { key: key()? },
        "list" => Request::List {
            prefix: string_field(&fields, "prefix")?
                .map(Text::into_string)
                .unwrap_or_default(),
        },
        "dump" => Request::Dump,
        "status" => Request::Status,
        "trigger" => {
            let reason = string_field(&fields, "reason")?;
            let reason = reason.as_ref().map_or("manual", Text::as_str);
            Request::Trigger(parse_trigger(reason).ok_or_else(|| {
                (
                    ErrorCode::BadRequest,
                    format!("unknown trigger reason: {reason}"),
                )
            })?)
        }
        "watch" => Request::Watch,
        "load" => Request::Load {
            entries: fields
                .get("entries")
                .ok_or_else(|| missing("entries"))?
                .get()
                .to_owned(),
        },
        "reload" => Request::Reload,
        other => return Err((ErrorCode::BadRequest, format!("unknown op: {other}"))),
    })
}

fn handle_request(
    driver: &mut Driver,
    line: &[u8],
    counters: &ControlCounters,
) -> Result<Answer, (ErrorCode, String)> {
    let reply = match parse_request(line)? {
        Request::Get { key } => {
            let value = driver.engine().get(&key).ok_or_else(|| {
                (
                    ErrorCode::NotFound,
                    format!("key not found: {}", crate::engine::shown_key(&key)),
                )
            })?;
            ok_reply(OkReply {
                value: Some(StoredValue::of(value)),
                ..OkReply::default()
            })
        }
        Request::Set { key, value } => {
            let result = driver.set(&key, &value);
            result.map_err(|failure| write_error(driver, &key, &value, failure))?;
            ok_reply(OkReply::default())
        }
        Request::Del { key } => {
            let result = driver.delete(&key);
            result.map_err(|failure| write_error(driver, &key, "", failure))?;
            ok_reply(OkReply::default())
        }
        Request::List { prefix } => ok_reply(OkReply {
            keys: Some(KeysPayload::Names(driver.list(&prefix))),
            ..OkReply::default()
        }),
        Request::Dump => ok_reply(OkReply {
            data: RawValue::from_string(driver.dump()).ok(),
            ..OkReply::default()
        }),
        Request::Status => {
            let mut status = driver.status();
            status.control = serde_json::to_value(counters).ok();
            ok_reply(OkReply {
                status: Some(status),
                ..OkReply::default()
            })
        }
        Request::Trigger(reason) => {
            driver.trigger(reason);
            ok_reply(OkReply::default())
        }
        Request::Watch => return Ok(Answer::Watch),
        Request::Load { entries } => {
            let entries = crate::persist::parse_load_entries(&entries)
                .map_err(|message| (ErrorCode::BadRequest, format!("\"entries\": {message}")))?;
            let report = driver.load(entries);
            serde_json::json!({
                "ok": true,
                "applied": report.applied,
                "unchanged": report.unchanged,
                "kept_newer": report.kept_newer,
                "rejected": report.rejected,
                "errors": report.errors,
            })
            .to_string()
        }
        Request::Reload => {
            let count = driver
                .reload_keys()
                .map_err(|message| (ErrorCode::ReloadFailed, message))?;
            ok_reply(OkReply {
                keys: Some(KeysPayload::Count(count)),
                ..OkReply::default()
            })
        }
    };
    Ok(Answer::Reply(reply))
}

/// Connects to a daemon's control socket after checking that the socket
/// belongs to this user or to root: in a directory others can write, a
/// socket of another user could be an impostor collecting what we send.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let meta = std::fs::metadata(path)?;
    let uid = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_socket() {
        return Err(io::Error::other(format!(
            "{} is not a socket",
            path.display()
        )));
    }
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing {}: it belongs to uid {}, not to you (uid {uid}) or root; \
                 another user may be impersonating the daemon",
                path.display(),
                meta.uid()
            ),
        ));
    }
    UnixStream::connect(path)
}

/// Trigger reasons as the CLI spells them.
pub fn parse_trigger(text: &str) -> Option<TriggerReason> {
    Some(match text {
        "power-on" => TriggerReason::PowerOn,
        "reconnect" => TriggerReason::Reconnect,
        "network-up" => TriggerReason::NetworkUp,
        "manual" => TriggerReason::Manual,
        _ => return None,
    })
}

/// One `watch` line, newline included.
pub fn change_line(change: &ChangeEvent) -> String {
    // Spelled out rather than derived: every receiver writes one per
    // change right after waking, and serde's derived, untagged path and
    // `fmt` for the origin are most of its cold cost. The test
    // `change_lines_are_what_serde_writes` holds it to serde's output.
    let value_len = change.value.as_ref().map_or(0, String::len);
    let mut line = Vec::with_capacity(change.key.len() + value_len + 64);
    line.extend_from_slice(b"{\"key\":");
    push_json_string(&mut line, &change.key);
    match &change.value {
        Some(value) => {
            line.extend_from_slice(b",\"value\":");
            match StoredValue::of(value.as_bytes()) {
                StoredValue::Json(raw) => line.extend_from_slice(raw.get().as_bytes()),
                StoredValue::Text(text) => push_json_string(&mut line, &text),
            }
        }
        None => line.extend_from_slice(b",\"deleted\":true"),
    }
    line.extend_from_slice(b",\"origin\":\"");
    line.extend_from_slice(crate::hex::encode(&change.origin.0.to_be_bytes()).as_bytes());
    line.extend_from_slice(b"\"}\n");
    // Only JSON text and hex went in.
    String::from_utf8(line).unwrap_or_default()
}

/// `text` as a JSON string, escaped by serde_json.
fn push_json_string(line: &mut Vec<u8>, text: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(line, text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver;
    use crate::engine::NodeId;
    use serde_json::Value;

    #[test]
    fn change_lines_are_json_with_values_embedded() {
        let set = ChangeEvent {
            key: "a\"b".into(),
            value: Some(r#"{"z":1,"a":2}"#.into()),
            origin: NodeId(1),
        };
        assert_eq!(
            change_line(&set),
            "{\"key\":\"a\\\"b\",\"value\":{\"z\":1,\"a\":2},\"origin\":\"0000000000000001\"}\n"
        );
        let deleted = ChangeEvent {
            key: "k".into(),
            value: None,
            origin: NodeId(2),
        };
        let parsed: Value = serde_json::from_str(&change_line(&deleted)).unwrap();
        assert_eq!(parsed["deleted"], true);
    }

    /// The line as serde derives it: what `change_line` spells out.
    fn change_line_by_serde(change: &ChangeEvent) -> String {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Line<'a> {
            Set {
                key: &'a str,
                value: StoredValue<'a>,
                origin: String,
            },
            Deleted {
                key: &'a str,
                deleted: bool,
                origin: String,
            },
        }
        let origin = change.origin.to_string();
        let line = match &change.value {
            Some(value) => Line::Set {
                key: &change.key,
                value: StoredValue::of(value.as_bytes()),
                origin,
            },
            None => Line::Deleted {
                key: &change.key,
                deleted: true,
                origin,
            },
        };
        format!("{}\n", serde_json::to_string(&line).unwrap())
    }

    proptest::proptest! {
        #[test]
        fn change_lines_are_what_serde_writes(
            key in "\\PC*|[\"\\\\/\u{0}-\u{1f}\u{7f}\u{2028}]{0,8}",
            value in proptest::option::of(
                "\\PC*|\\{\"[a-z\"\\\\]{0,4}\":\\[[0-9, ]{0,6}\\]\\}|\"[\u{0}-\u{7f}]{0,6}\"|-?[0-9]{1,3}(\\.[0-9]+)?"
            ),
            origin in proptest::num::u64::ANY,
        ) {
            let change = ChangeEvent { key, value, origin: NodeId(origin) };
            let line = change_line(&change);
            proptest::prop_assert_eq!(&line, &change_line_by_serde(&change));
            let parsed: Value = serde_json::from_str(&line).unwrap();
            proptest::prop_assert_eq!(parsed["key"].as_str(), Some(change.key.as_str()));
        }
    }

    #[test]
    fn a_lone_surrogate_value_parses_as_syntax_but_is_refused_as_json() {
        // Found by the control_request fuzz target.
        let line = br#"{"op":"set","key":"scgn/8","value":{"??????uda60\uDdaa9?":true}}"#;
        let Ok(Request::Set { value, .. }) = parse_request(line) else {
            panic!("a syntactically valid set request");
        };
        assert!(driver::compact_json(&value).is_err());
    }

    #[test]
    fn escaped_field_names_and_strings_read_as_their_text() {
        // Borrowed from the line where it can be, copied where an escape
        // had to be undone: both read the same.
        let plain = parse_request(br#"{"op":"set","key":"a/b","value":[1]}"#);
        let escaped = parse_request(br#"{"\u006fp":"s\u0065t","k\u0065y":"a\/b","value":[1]}"#);
        assert_eq!(
            plain,
            Ok(Request::Set {
                key: "a/b".to_owned(),
                value: "[1]".to_owned()
            })
        );
        assert_eq!(escaped, plain);
        // A field named twice is caught however each is spelled.
        let (code, message) =
            parse_request(br#"{"op":"get","key":"a","k\u0065y":"b"}"#).unwrap_err();
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(message.contains("\"key\" given twice"), "{message}");
    }

    #[test]
    fn a_request_with_more_fields_than_the_bound_is_refused() {
        let with_fields = |count: usize| {
            let extra: String = (2..count)
                .map(|index| format!(r#","x{index}":0"#))
                .collect();
            format!(r#"{{"op":"get","key":"a"{extra}}}"#)
        };
        assert_eq!(
            parse_request(with_fields(REQUEST_FIELDS_MAX).as_bytes()),
            Ok(Request::Get {
                key: "a".to_owned()
            })
        );
        let (code, message) =
            parse_request(with_fields(REQUEST_FIELDS_MAX + 1).as_bytes()).unwrap_err();
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(
            message.contains(&format!("more than {REQUEST_FIELDS_MAX} fields")),
            "{message}"
        );
    }

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_request(br#"{"op":"trigger","reason":"network-up"}"#),
            Ok(Request::Trigger(TriggerReason::NetworkUp))
        );
        assert_eq!(
            parse_request(br#"{"op":"list"}"#),
            Ok(Request::List {
                prefix: String::new()
            })
        );
        assert_eq!(
            parse_request(br#"{"op":"load","entries":[{"k":"a","v":1}]}"#),
            Ok(Request::Load {
                entries: r#"[{"k":"a","v":1}]"#.to_owned()
            })
        );
        let half_versioned = r#"[{"k":"a","t":5,"v":1}]"#;
        assert!(crate::persist::parse_load_entries(half_versioned).is_err());
        let both = crate::persist::parse_load_entries(
            r#"[{"k":"a","v":{"x":1}},{"k":"b","t":5,"o":"00000000000000aa","d":1}]"#,
        )
        .unwrap();
        assert_eq!(both[0].1, None);
        assert_eq!(both[0].2.as_deref(), Some(&b"{\"x\":1}"[..]));
        assert_eq!(both[1].1.map(|version| version.hlc.0), Some(5));
        assert_eq!(both[1].2, None);
        for bad in [
            &b"[1]"[..],
            b"{\"op\":\"load\"}",
            b"{\"op\":7}",
            b"{\"op\":\"get\"}",
            b"{\"op\":\"explode\"}",
            b"\xff",
            br#"{"op":"get","key":"a","op":"del"}"#,
            br#"{"op":"set","key":"a","value":1,"value":2}"#,
        ] {
            let (code, message) = parse_request(bad).unwrap_err();
            assert_eq!(code, ErrorCode::BadRequest, "{message}");
            assert!(!message.is_empty());
        }
    }
}
