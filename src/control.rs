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
//! {"op":"watch"}                        {"ok":true} then one line per change:
//!     {"key":"home/1","value":<JSON>,"origin":"<node id>"}
//!     {"key":"home/1","deleted":true,"origin":"<node id>"}
//! ```
//!
//! Errors: `{"ok":false,"error":"<code>","message":"<text>"}` with code one
//! of [`ErrorCode`]'s names.
//!
//! Values are embedded as JSON (not as strings) so the socket is pleasant
//! to use with `socat`; the daemon still takes them as raw text, so member
//! order and number spelling survive exactly.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde_json::Value;
use serde_json::value::RawValue;

use crate::driver::{self, ChangeEvent, Driver, SetError};
use crate::engine::{TriggerReason, WriteError};

/// A request line longer than this closes the connection; it is well above
/// the largest value (64 KiB) so any valid `set` fits.
pub const REQUEST_BYTES_MAX: usize = 1024 * 1024;
/// A client (a slow `watch`) whose unsent replies pass this is dropped, so
/// the daemon's memory stays bounded.
pub const CLIENT_BACKLOG_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Connections served at once.
pub const CLIENTS_MAX: usize = 32;

/// Error codes of the protocol.
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
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::VersionExhausted => "version_exhausted",
        }
    }
}

/// Why the control socket could not be served.
#[derive(Debug)]
pub enum ControlError {
    /// Another daemon answers on this path.
    InUse(PathBuf),
    /// The socket could not be bound.
    Bind(PathBuf, io::Error),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::InUse(path) => {
                write!(f, "a daemon is already serving {}", path.display())
            }
            ControlError::Bind(path, error) => {
                write!(f, "cannot listen on {}: {error}", path.display())
            }
        }
    }
}

impl std::error::Error for ControlError {}

#[derive(Debug)]
struct Client {
    stream: UnixStream,
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    watching: bool,
    /// Read side finished (EOF or error): close once the outbox is sent.
    done_reading: bool,
    broken: bool,
}

/// The daemon's side of the control socket.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    clients: Vec<Client>,
}

impl ControlServer {
    /// Listens on `path`, mode 0600. A stale socket file left by a crashed
    /// daemon is replaced; a live one is an error.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
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
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fds to poll: the listener (readable) and every client, with
    /// whether it has output waiting (poll it for writable too).
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, bool)> {
        let mut fds = vec![(self.listener.as_fd(), false)];
        fds.extend(
            self.clients
                .iter()
                .map(|client| (client.stream.as_fd(), !client.outbox.is_empty())),
        );
        fds
    }

    /// Accepts, reads, answers and writes whatever is ready; never blocks.
    pub fn process(&mut self, driver: &mut Driver) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= CLIENTS_MAX || stream.set_nonblocking(true).is_err() {
                        log::warn!("control socket: too many clients; refusing one");
                        continue;
                    }
                    self.clients.push(Client {
                        stream,
                        inbox: Vec::new(),
                        outbox: Vec::new(),
                        watching: false,
                        done_reading: false,
                        broken: false,
                    });
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    log::warn!("control socket accept: {error}");
                    break;
                }
            }
        }
        for client in &mut self.clients {
            client.read(driver);
            client.write();
        }
        self.clients
            .retain(|client| !(client.broken || client.done_reading && client.outbox.is_empty()));
    }

    /// Sends a change to every `watch` client.
    pub fn broadcast(&mut self, change: &ChangeEvent) {
        let line = change_line(change);
        for client in self.clients.iter_mut().filter(|client| client.watching) {
            client.outbox.extend_from_slice(line.as_bytes());
            if client.outbox.len() > CLIENT_BACKLOG_BYTES_MAX {
                log::warn!("control socket: a watch client fell too far behind; dropping it");
                client.broken = true;
            }
        }
    }

    /// Writes what is pending without blocking (after a broadcast).
    pub fn flush(&mut self) {
        for client in &mut self.clients {
            client.write();
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
    fn read(&mut self, driver: &mut Driver) {
        let mut buf = [0u8; 16 * 1024];
        while !self.done_reading && !self.broken {
            match self.stream.read(&mut buf) {
                Ok(0) => self.done_reading = true,
                Ok(len) => self.inbox.extend_from_slice(&buf[..len]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => self.broken = true,
            }
            while let Some(end) = self.inbox.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = self.inbox.drain(..=end).collect();
                let reply = self.answer(driver, &line[..end]);
                self.outbox.extend_from_slice(reply.as_bytes());
                self.outbox.push(b'\n');
            }
            if self.inbox.len() > REQUEST_BYTES_MAX {
                let reply = error_reply(ErrorCode::BadRequest, "request line too long");
                self.outbox.extend_from_slice(reply.as_bytes());
                self.outbox.push(b'\n');
                self.inbox.clear();
                self.done_reading = true;
            }
        }
    }

    fn write(&mut self) {
        while !self.outbox.is_empty() && !self.broken {
            match self.stream.write(&self.outbox) {
                Ok(0) => self.broken = true,
                Ok(len) => {
                    self.outbox.drain(..len);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => self.broken = true,
            }
        }
        // A watcher stays until it hangs up; its EOF means "stop".
    }

    fn answer(&mut self, driver: &mut Driver, line: &[u8]) -> String {
        match handle_request(driver, line) {
            Ok(Answer::Reply(reply)) => reply,
            Ok(Answer::Watch) => {
                self.watching = true;
                r#"{"ok":true}"#.to_owned()
            }
            Err((code, message)) => error_reply(code, &message),
        }
    }
}

enum Answer {
    Reply(String),
    Watch,
}

fn error_reply(code: ErrorCode, message: &str) -> String {
    serde_json::json!({"ok": false, "error": code.name(), "message": message}).to_string()
}

fn write_error(error: SetError) -> (ErrorCode, String) {
    let code = match &error {
        SetError::InvalidJson(_) => ErrorCode::InvalidJson,
        SetError::Write(WriteError::InvalidKey) => ErrorCode::InvalidKey,
        SetError::Write(WriteError::ValueTooLarge) => ErrorCode::TooLarge,
        SetError::Write(WriteError::StoreFull) => ErrorCode::StoreFull,
        SetError::Write(WriteError::NotFound) => ErrorCode::NotFound,
        SetError::Write(WriteError::VersionExhausted) => ErrorCode::VersionExhausted,
    };
    (code, error.to_string())
}

/// Takes a string field of a request.
fn string_field(
    fields: &BTreeMap<String, Box<RawValue>>,
    name: &str,
) -> Result<Option<String>, (ErrorCode, String)> {
    match fields.get(name) {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<String>(raw.get())
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
}

/// Parses one request line. Untrusted input (any local root process can
/// connect): it never panics and is fuzzed (`fuzz/`, target
/// `control_request`).
pub fn parse_request(line: &[u8]) -> Result<Request, (ErrorCode, String)> {
    // Raw fields, so a value keeps its exact text (and a JSON null value
    // stays distinct from a missing one).
    let fields: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(line).map_err(|error| {
            (
                ErrorCode::BadRequest,
                format!("request is not a JSON object: {error}"),
            )
        })?;
    let op =
        string_field(&fields, "op")?.ok_or((ErrorCode::BadRequest, "missing \"op\"".to_owned()))?;
    let key = || {
        string_field(&fields, "key")?.ok_or((ErrorCode::BadRequest, "missing \"key\"".to_owned()))
    };
    Ok(match op.as_str() {
        "get" => Request::Get { key: key()? },
        "set" => Request::Set {
            key: key()?,
            value: fields
                .get("value")
                .ok_or((ErrorCode::BadRequest, "missing \"value\"".to_owned()))?
                .get()
                .to_owned(),
        },
        "del" => Request::Del { key: key()? },
        "list" => Request::List {
            prefix: string_field(&fields, "prefix")?.unwrap_or_default(),
        },
        "dump" => Request::Dump,
        "status" => Request::Status,
        "trigger" => {
            let reason = string_field(&fields, "reason")?.unwrap_or_else(|| "manual".to_owned());
            Request::Trigger(parse_trigger(&reason).ok_or((
                ErrorCode::BadRequest,
                format!("unknown trigger reason: {reason}"),
            ))?)
        }
        "watch" => Request::Watch,
        other => return Err((ErrorCode::BadRequest, format!("unknown op: {other}"))),
    })
}

fn handle_request(driver: &mut Driver, line: &[u8]) -> Result<Answer, (ErrorCode, String)> {
    let ok = |extra: Option<(&str, String)>| match extra {
        None => r#"{"ok":true}"#.to_owned(),
        Some((name, json)) => format!("{{\"ok\":true,\"{name}\":{json}}}"),
    };
    Ok(Answer::Reply(match parse_request(line)? {
        Request::Get { key } => {
            let value = driver
                .engine()
                .get(&key)
                .ok_or((ErrorCode::NotFound, format!("key not found: {key}")))?;
            let mut json = String::new();
            driver::push_json(&mut json, value);
            ok(Some(("value", json)))
        }
        Request::Set { key, value } => {
            driver.set(&key, &value).map_err(|failure| match failure {
                SetError::Write(WriteError::ValueTooLarge) => (
                    ErrorCode::TooLarge,
                    format!(
                        "value is too large: {} bytes, the limit is {} bytes",
                        value.len(),
                        driver.engine().config().store.value_bytes_max
                    ),
                ),
                other => write_error(other),
            })?;
            ok(None)
        }
        Request::Del { key } => {
            driver.delete(&key).map_err(write_error)?;
            ok(None)
        }
        Request::List { prefix } => ok(Some((
            "keys",
            Value::from(driver.list(&prefix)).to_string(),
        ))),
        Request::Dump => ok(Some(("data", driver.dump()))),
        Request::Status => ok(Some(("status", driver.status().to_string()))),
        Request::Trigger(reason) => {
            driver.trigger(reason);
            ok(None)
        }
        Request::Watch => return Ok(Answer::Watch),
    }))
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
    let key = Value::from(change.key.as_str()).to_string();
    match &change.value {
        Some(value) => {
            let mut json = String::new();
            driver::push_json(&mut json, value.as_bytes());
            format!(
                "{{\"key\":{key},\"value\":{json},\"origin\":\"{}\"}}\n",
                change.origin
            )
        }
        None => format!(
            "{{\"key\":{key},\"deleted\":true,\"origin\":\"{}\"}}\n",
            change.origin
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::NodeId;

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
        for bad in [
            &b"[1]"[..],
            b"{\"op\":7}",
            b"{\"op\":\"get\"}",
            b"{\"op\":\"explode\"}",
            b"\xff",
        ] {
            let (code, message) = parse_request(bad).unwrap_err();
            assert_eq!(code, ErrorCode::BadRequest, "{message}");
            assert!(!message.is_empty());
        }
    }
}
