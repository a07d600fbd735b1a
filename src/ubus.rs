//! The daemon as the ubus object `gwsync`, speaking the ubus protocol
//! natively: no libubus, libubox or json-c linked, so the binary keeps no
//! runtime dependency and the object costs about 31 KiB of code on mipsel
//! (10 KiB xz-compressed, as on flash). Cargo feature `ubus`, on by
//! default; without it src/ubus_off.rs stands in.
//!
//! On OpenWrt every component talks over ubus (netifd, procd, rpcd, LuCI),
//! so the shared data set is reachable from shell (`ubus call`), C
//! (libubus), ucode, Lua and the web UI without linking libgwsync:
//!
//! ```text
//! get {key}                     {"key","value","version","origin"}
//! set {key, value}              {}          value: any JSON (blobmsg)
//! del {key}                     {}
//! list {prefix?,offset?,limit?} {"keys":[...],"total":N}
//! dump                          {"entries":{key: value, ...}}
//! status                        the status object (`gwsync status --json`)
//! trigger {reason?}             {}          power-on|reconnect|network-up|manual
//! reload                        {}          re-reads the key file (as SIGHUP)
//! ```
//!
//! Errors are ubus status codes: `INVALID_ARGUMENT` (2) for missing or
//! mistyped arguments, bad keys and values over the size limit, `NOT_FOUND`
//! (4), `METHOD_NOT_FOUND` (3), `UNKNOWN_ERROR` (9) when the store is full,
//! the key file cannot be reloaded or a reply would not fit in one ubus
//! message. With an error the object
//! also sends `{"error": "<text>"}` first, which `ubus call` prints.
//! `PERMISSION_DENIED` (6) comes from rpcd/uhttpd, never from here: the
//! ACL file `/usr/share/rpcd/acl.d/gwsync.json` decides who may call what.
//!
//! Every change, local or from the LAN, is sent as the event
//! `gwsync.change` (`{"key","value","origin"}` or
//! `{"key","deleted":true,"origin"}`), for `ubus listen`, and, when the
//! object has subscribers, also as the notification `change` with the same
//! body (`ubus subscribe gwsync`): events reach every listener with no set
//! up, notifications are what a ucode/C subscriber of one object expects,
//! and a notification costs nothing while nobody subscribes (ubusd tells
//! the object when its first subscriber comes and its last one goes).
//!
//! # Protocol (ubus `ubusmsg.h`, libubox `blob.h`/`blobmsg.h`)
//!
//! A message is an 8-byte header (version 0, type, big-endian seq and peer)
//! and one blob attribute holding the message attributes. A blob attribute
//! is a big-endian `u32` (bit 31 extended, bits 24-30 id, bits 0-23 length
//! including these 4 bytes), its payload, and zero padding to 4 bytes. A
//! blobmsg attribute is an extended blob attribute whose payload starts with
//! a big-endian `u16` name length, the name, a NUL and padding to 4 bytes;
//! its id is the blobmsg type. Everything read from the socket is checked
//! against these lengths before use: a malformed message drops the
//! connection (counted), never the daemon.
//!
//! # Connection
//!
//! The object is registered when ubusd's socket answers and re-registered
//! after ubusd restarts (procd respawns it): a lost connection is retried
//! every [`RECONNECT_MS_MIN`] doubling to [`RECONNECT_MS_MAX`]. Where ubusd
//! does not exist (plain Linux) that retry is one failing `connect` every
//! two seconds and nothing else changes. Changes made while a once-present
//! ubusd is away are kept (up to [`OFFLINE_BACKLOG_BYTES_MAX`]) and sent as
//! events once the object is back, so a listener that attaches to the new
//! ubusd loses nothing.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::control;
use crate::driver::{self, ChangeEvent, Driver, SetError};
use crate::engine::WriteError;

/// Where ubusd listens on OpenWrt (`UBUS_UNIX_SOCKET` in ubus's build).
pub const SOCKET_DEFAULT: &str = "/var/run/ubus/ubus.sock";
/// ubusd's limit on one message (`UBUS_MAX_MSGLEN`): it drops a client that
/// sends more, so replies are checked against it before they are sent.
pub const MESSAGE_BYTES_MAX: usize = 1024 * 1024;
/// Containers nested deeper than this in a request are refused (bounds the
/// recursion of the blobmsg-to-JSON conversion).
pub const NESTING_DEPTH_MAX: usize = 64;
/// Output ubusd has not taken yet; past it the connection is dropped and
/// re-made, so a stuck ubusd cannot grow the daemon's memory.
pub const OUTBOX_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Change events kept while a once-present ubusd is away.
pub const OFFLINE_BACKLOG_BYTES_MAX: usize = 256 * 1024;
/// First retry after a lost or failed connection.
pub const RECONNECT_MS_MIN: u64 = 250;
/// Retry interval ceiling, and the cost of gwsync where ubusd never runs.
pub const RECONNECT_MS_MAX: u64 = 2_000;
/// The ubus object name.
pub const OBJECT_NAME: &str = "gwsync";
/// The event every change is sent as.
pub const EVENT_CHANGE: &str = "gwsync.change";

// --------------------------------------------------------------- blob / blobmsg

/// The blob and blobmsg TLV encoding of libubox.
pub mod blob {
    /// Bit 31: a blobmsg attribute (with a name header).
    pub const EXTENDED: u32 = 0x8000_0000;
    const ID_SHIFT: u32 = 24;
    const ID_MASK: u32 = 0x7f;
    const LEN_MASK: u32 = 0x00ff_ffff;
    /// Header bytes of every attribute.
    pub const HEADER: usize = 4;

    pub const TYPE_UNSPEC: u8 = 0;
    pub const TYPE_ARRAY: u8 = 1;
    pub const TYPE_TABLE: u8 = 2;
    pub const TYPE_STRING: u8 = 3;
    pub const TYPE_INT64: u8 = 4;
    pub const TYPE_INT32: u8 = 5;
    pub const TYPE_INT16: u8 = 6;
    pub const TYPE_INT8: u8 = 7;
    pub const TYPE_DOUBLE: u8 = 8;

    /// Rounds a length up to the 4-byte attribute alignment.
    pub fn pad(len: usize) -> usize {
        len.saturating_add(3) & !3
    }

    /// Why bytes are not a well-formed blob or blobmsg attribute list.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Error {
        /// An attribute's length is below its header or past its container.
        Length,
        /// A blobmsg name header is short, unterminated or not UTF-8.
        Name,
        /// A payload does not fit its type (an int of the wrong size, a
        /// string without its NUL or not UTF-8).
        Payload,
        /// A container nests deeper than the limit.
        Depth,
    }

    /// One attribute, checked: `payload` lies inside the buffer.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Attr<'a> {
        pub id: u8,
        pub extended: bool,
        pub payload: &'a [u8],
    }

    impl<'a> Attr<'a> {
        pub fn u32(&self) -> Result<u32, Error> {
            let bytes: [u8; 4] = self.payload.try_into().map_err(|_| Error::Payload)?;
            Ok(u32::from_be_bytes(bytes))
        }

        pub fn u8(&self) -> Result<u8, Error> {
            match self.payload {
                [byte] => Ok(*byte),
                _ => Err(Error::Payload),
            }
        }

        /// A NUL-terminated UTF-8 string payload.
        pub fn str(&self) -> Result<&'a str, Error> {
            c_str(self.payload)
        }

        /// The blobmsg view of an extended attribute.
        pub fn msg(&self) -> Result<Msg<'a>, Error> {
            if !self.extended {
                return Err(Error::Name);
            }
            let [high, low, rest @ ..] = self.payload else {
                return Err(Error::Name);
            };
            let name_len = u16::from_be_bytes([*high, *low]) as usize;
            let header = pad(2 + name_len + 1);
            if header > self.payload.len() || rest.get(name_len) != Some(&0) {
                return Err(Error::Name);
            }
            let name = std::str::from_utf8(&rest[..name_len]).map_err(|_| Error::Name)?;
            Ok(Msg {
                kind: self.id,
                name,
                data: &self.payload[header..],
            })
        }
    }

    fn c_str(bytes: &[u8]) -> Result<&str, Error> {
        let (&0, text) = bytes.split_last().ok_or(Error::Payload)? else {
            return Err(Error::Payload);
        };
        if text.contains(&0) {
            return Err(Error::Payload);
        }
        std::str::from_utf8(text).map_err(|_| Error::Payload)
    }

    /// A blobmsg attribute: type, name and data.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Msg<'a> {
        pub kind: u8,
        pub name: &'a str,
        pub data: &'a [u8],
    }

    impl<'a> Msg<'a> {
        pub fn str(&self) -> Result<&'a str, Error> {
            if self.kind != TYPE_STRING {
                return Err(Error::Payload);
            }
            c_str(self.data)
        }

        /// An integer of any blobmsg width, signed as blobmsg_json reads it.
        pub fn int(&self) -> Result<i64, Error> {
            let data = self.data;
            Ok(match self.kind {
                TYPE_INT8 => i8::from_be_bytes(data.try_into().map_err(|_| Error::Payload)?) as i64,
                TYPE_INT16 => {
                    i16::from_be_bytes(data.try_into().map_err(|_| Error::Payload)?) as i64
                }
                TYPE_INT32 => {
                    i32::from_be_bytes(data.try_into().map_err(|_| Error::Payload)?) as i64
                }
                TYPE_INT64 => i64::from_be_bytes(data.try_into().map_err(|_| Error::Payload)?),
                _ => return Err(Error::Payload),
            })
        }
    }

    /// The attributes in `buf`, each checked to lie inside it. Trailing
    /// bytes too short for a header are an error, as is any overrun.
    pub fn attrs(buf: &[u8]) -> Attrs<'_> {
        Attrs { rest: buf }
    }

    /// Iterator of [`attrs`]; yields one error and then stops.
    pub struct Attrs<'a> {
        rest: &'a [u8],
    }

    impl<'a> Iterator for Attrs<'a> {
        type Item = Result<Attr<'a>, Error>;

        fn next(&mut self) -> Option<Self::Item> {
            if self.rest.is_empty() {
                return None;
            }
            let Some(head) = self.rest.get(..HEADER) else {
                self.rest = &[];
                return Some(Err(Error::Length));
            };
            let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            let len = (word & LEN_MASK) as usize;
            if len < HEADER || len > self.rest.len() {
                self.rest = &[];
                return Some(Err(Error::Length));
            }
            let attr = Attr {
                id: ((word >> ID_SHIFT) & ID_MASK) as u8,
                extended: word & EXTENDED != 0,
                payload: &self.rest[HEADER..len],
            };
            // The last attribute of a container may omit its padding.
            self.rest = self.rest.get(pad(len)..).unwrap_or(&[]);
            Some(Ok(attr))
        }
    }

    /// Builds blob and blobmsg attributes into one buffer.
    #[derive(Debug, Default)]
    pub struct Writer {
        pub buf: Vec<u8>,
    }

    impl Writer {
        /// Opens an attribute whose payload follows; close with [`end`].
        ///
        /// [`end`]: Writer::end
        pub fn begin(&mut self, id: u8, extended: bool) -> usize {
            let at = self.buf.len();
            let flag = if extended { EXTENDED } else { 0 };
            self.buf
                .extend_from_slice(&(flag | (u32::from(id) & ID_MASK) << ID_SHIFT).to_be_bytes());
            at
        }

        /// Closes the attribute opened at `at`: writes its length and pads.
        /// Lengths past 24 bits are caught by the message size check.
        pub fn end(&mut self, at: usize) {
            let len = (self.buf.len() - at).min(LEN_MASK as usize) as u32;
            let word = u32::from_be_bytes([
                self.buf[at],
                self.buf[at + 1],
                self.buf[at + 2],
                self.buf[at + 3],
            ]);
            self.buf[at..at + 4].copy_from_slice(&((word & !LEN_MASK) | len).to_be_bytes());
            self.buf.resize(pad(self.buf.len()), 0);
        }

        pub fn put(&mut self, id: u8, payload: &[u8]) {
            let at = self.begin(id, false);
            self.buf.extend_from_slice(payload);
            self.end(at);
        }

        pub fn put_u32(&mut self, id: u8, value: u32) {
            self.put(id, &value.to_be_bytes());
        }

        pub fn put_str(&mut self, id: u8, text: &str) {
            let at = self.begin(id, false);
            self.buf.extend_from_slice(text.as_bytes());
            self.buf.push(0);
            self.end(at);
        }

        /// Opens a blobmsg attribute of `kind` named `name` (names longer
        /// than a `u16` are cut; they never come from gwsync's own data,
        /// whose keys are short).
        pub fn msg_begin(&mut self, kind: u8, name: &str) -> usize {
            let at = self.begin(kind, true);
            let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
            self.buf
                .extend_from_slice(&(name.len() as u16).to_be_bytes());
            self.buf.extend_from_slice(name);
            self.buf.push(0);
            self.buf.resize(pad(self.buf.len()), 0);
            at
        }

        pub fn msg(&mut self, kind: u8, name: &str, data: &[u8]) {
            let at = self.msg_begin(kind, name);
            self.buf.extend_from_slice(data);
            self.end(at);
        }

        pub fn msg_str(&mut self, name: &str, text: &str) {
            let at = self.msg_begin(TYPE_STRING, name);
            self.buf.extend_from_slice(text.as_bytes());
            self.buf.push(0);
            self.end(at);
        }
    }
}

use blob::{Msg, Writer};

// ------------------------------------------------------------ JSON <-> blobmsg

/// Writes JSON text as blobmsg attributes the way libubox's blobmsg_json
/// does (ints that fit 32 bits as INT32, others INT64, fractions and
/// integers past `i64` as DOUBLE, booleans as INT8, null as UNSPEC), keeping
/// object members in document order. `name` is the attribute's name; an
/// object at the top with `name == None` writes its members unwrapped (the
/// body of a ubus reply is a table's contents).
/// On error `out` is left as it was.
pub fn json_to_blobmsg(out: &mut Writer, name: Option<&str>, json: &str) -> Result<(), String> {
    use serde::de::DeserializeSeed;
    let start = out.buf.len();
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let seed = BlobSeed {
        out: &mut *out,
        name: name.unwrap_or(""),
        unwrap: name.is_none(),
    };
    let result = seed
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end())
        .map_err(|error| error.to_string());
    if result.is_err() {
        out.buf.truncate(start);
    }
    result
}

/// Why a value cannot go out over ubus: blobmsg strings end at a NUL, as C
/// strings do (libubox's own JSON conversion cannot carry one either).
const NUL_IN_STRING: &str =
    "a string holds a NUL character (\\u0000), which ubus strings cannot carry";

struct BlobSeed<'w, 'n> {
    out: &'w mut Writer,
    name: &'n str,
    /// Write an object's members without a table around them.
    unwrap: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for BlobSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BlobSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<(), E> {
        self.out.msg(blob::TYPE_INT8, self.name, &[value as u8]);
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<(), E> {
        match i32::try_from(value) {
            Ok(small) => self
                .out
                .msg(blob::TYPE_INT32, self.name, &small.to_be_bytes()),
            Err(_) => self
                .out
                .msg(blob::TYPE_INT64, self.name, &value.to_be_bytes()),
        }
        Ok(())
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<(), E> {
        match i64::try_from(value) {
            Ok(signed) => self.visit_i64(signed),
            Err(_) => self.visit_f64(value as f64),
        }
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<(), E> {
        self.out
            .msg(blob::TYPE_DOUBLE, self.name, &value.to_bits().to_be_bytes());
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<(), E> {
        if value.contains('\0') {
            return Err(E::custom(NUL_IN_STRING));
        }
        self.out.msg_str(self.name, value);
        Ok(())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.out.msg(blob::TYPE_UNSPEC, self.name, &[]);
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let at = self.out.msg_begin(blob::TYPE_ARRAY, self.name);
        while seq
            .next_element_seed(BlobSeed {
                out: &mut *self.out,
                name: "",
                unwrap: false,
            })?
            .is_some()
        {}
        self.out.end(at);
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let at = (!self.unwrap).then(|| self.out.msg_begin(blob::TYPE_TABLE, self.name));
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key.contains('\0') || key.len() > u16::MAX as usize {
                return Err(serde::de::Error::custom(
                    "a member name holds a NUL character or is over 65535 bytes, which blobmsg cannot carry",
                ));
            }
            map.next_value_seed(BlobSeed {
                out: &mut *self.out,
                name: &key,
                unwrap: false,
            })?;
        }
        if let Some(at) = at {
            self.out.end(at);
        }
        Ok(())
    }
}

/// Appends one blobmsg attribute as JSON text, the way blobmsg_json reads
/// it (INT8 is a boolean). Refuses what JSON cannot say (NaN, infinities)
/// and malformed or too deeply nested input.
pub fn blobmsg_to_json(out: &mut String, msg: &Msg, depth: usize) -> Result<(), blob::Error> {
    use blob::Error;
    match msg.kind {
        blob::TYPE_UNSPEC => out.push_str("null"),
        blob::TYPE_INT8 => out.push_str(if msg.int()? != 0 { "true" } else { "false" }),
        blob::TYPE_INT16 | blob::TYPE_INT32 | blob::TYPE_INT64 => {
            out.push_str(&msg.int()?.to_string())
        }
        blob::TYPE_DOUBLE => {
            let bits: [u8; 8] = msg.data.try_into().map_err(|_| Error::Payload)?;
            let number = serde_json::Number::from_f64(f64::from_bits(u64::from_be_bytes(bits)))
                .ok_or(Error::Payload)?;
            out.push_str(&number.to_string());
        }
        blob::TYPE_STRING => out.push_str(&serde_json::Value::from(msg.str()?).to_string()),
        blob::TYPE_ARRAY | blob::TYPE_TABLE => {
            if depth >= NESTING_DEPTH_MAX {
                return Err(Error::Depth);
            }
            let table = msg.kind == blob::TYPE_TABLE;
            out.push(if table { '{' } else { '[' });
            for (index, attr) in blob::attrs(msg.data).enumerate() {
                let inner = attr?.msg()?;
                if index > 0 {
                    out.push(',');
                }
                if table {
                    out.push_str(&serde_json::Value::from(inner.name).to_string());
                    out.push(':');
                }
                blobmsg_to_json(out, &inner, depth + 1)?;
            }
            out.push(if table { '}' } else { ']' });
        }
        _ => return Err(Error::Payload),
    }
    Ok(())
}

// ------------------------------------------------------------------ messages

/// Message types (`enum ubus_msg_type`).
pub mod msg_type {
    pub const HELLO: u8 = 0;
    pub const STATUS: u8 = 1;
    pub const DATA: u8 = 2;
    pub const PING: u8 = 3;
    pub const INVOKE: u8 = 5;
    pub const ADD_OBJECT: u8 = 6;
    pub const NOTIFY: u8 = 10;
}

/// Message attributes (`enum ubus_msg_attr`).
pub mod attr {
    pub const STATUS: u8 = 1;
    pub const OBJPATH: u8 = 2;
    pub const OBJID: u8 = 3;
    pub const METHOD: u8 = 4;
    pub const SIGNATURE: u8 = 6;
    pub const DATA: u8 = 7;
    pub const ACTIVE: u8 = 9;
    pub const NO_REPLY: u8 = 10;
}

/// ubus status codes (`enum ubus_msg_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    InvalidArgument = 2,
    MethodNotFound = 3,
    NotFound = 4,
    PermissionDenied = 6,
    UnknownError = 9,
}

/// The object id of ubusd's event broker (`UBUS_SYSTEM_OBJECT_EVENT`).
const EVENT_OBJECT: u32 = 1;
/// Message header bytes.
pub const HEADER_BYTES: usize = 8;

/// A message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub seq: u16,
    pub peer: u32,
}

/// The attributes of one message that the object uses; unknown ones are
/// skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fields<'a> {
    pub status: Option<u32>,
    pub objid: Option<u32>,
    pub method: Option<&'a str>,
    /// The payload of the DATA attribute: blobmsg attributes.
    pub data: Option<&'a [u8]>,
    pub active: Option<u8>,
    pub no_reply: Option<u8>,
}

/// Why bytes from ubusd were not a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The header's version is not 0.
    Version,
    /// The length is below the minimum or above [`MESSAGE_BYTES_MAX`].
    Length,
    /// The attributes are malformed.
    Blob(blob::Error),
}

impl From<blob::Error> for DecodeError {
    fn from(error: blob::Error) -> Self {
        DecodeError::Blob(error)
    }
}

/// How many bytes the message at the start of `buf` takes, once its header
/// is there (`Ok(None)`: not yet).
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    let Some(head) = buf.get(..HEADER_BYTES + blob::HEADER) else {
        return Ok(None);
    };
    if head[0] != 0 {
        return Err(DecodeError::Version);
    }
    let word = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    let len = (word & 0x00ff_ffff) as usize;
    if len < blob::HEADER || blob::pad(len) > MESSAGE_BYTES_MAX {
        return Err(DecodeError::Length);
    }
    Ok(Some(HEADER_BYTES + len))
}

/// Decodes one whole message (as [`frame_len`] measured it).
pub fn decode(frame: &[u8]) -> Result<(Header, Fields<'_>), DecodeError> {
    let len = frame_len(frame)?.ok_or(DecodeError::Length)?;
    if len != frame.len() {
        return Err(DecodeError::Length);
    }
    let header = Header {
        kind: frame[1],
        seq: u16::from_be_bytes([frame[2], frame[3]]),
        peer: u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]),
    };
    let mut fields = Fields::default();
    for attr in blob::attrs(&frame[HEADER_BYTES + blob::HEADER..]) {
        let attr = attr?;
        match attr.id {
            attr::STATUS => fields.status = Some(attr.u32()?),
            attr::OBJID => fields.objid = Some(attr.u32()?),
            attr::METHOD => fields.method = Some(attr.str()?),
            attr::DATA => fields.data = Some(attr.payload),
            attr::ACTIVE => fields.active = Some(attr.u8()?),
            attr::NO_REPLY => fields.no_reply = Some(attr.u8()?),
            _ => {}
        }
    }
    Ok((header, fields))
}

/// Frames a message: header, then the attributes `body` wrote.
fn frame(kind: u8, seq: u16, peer: u32, body: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let mut out = Writer::default();
    out.buf.extend_from_slice(&[0, kind]);
    out.buf.extend_from_slice(&seq.to_be_bytes());
    out.buf.extend_from_slice(&peer.to_be_bytes());
    let at = out.begin(0, false);
    body(&mut out);
    out.end(at);
    out.buf
}

/// The methods and their argument types, as `ubus -v list` shows them.
const SIGNATURE: &[(&str, &[(&str, u8)])] = &[
    ("get", &[("key", blob::TYPE_STRING)]),
    (
        "set",
        &[("key", blob::TYPE_STRING), ("value", blob::TYPE_UNSPEC)],
    ),
    ("del", &[("key", blob::TYPE_STRING)]),
    (
        "list",
        &[
            ("prefix", blob::TYPE_STRING),
            ("offset", blob::TYPE_INT32),
            ("limit", blob::TYPE_INT32),
        ],
    ),
    ("dump", &[]),
    ("status", &[]),
    ("trigger", &[("reason", blob::TYPE_STRING)]),
    ("reload", &[]),
];

fn add_object_message(seq: u16) -> Vec<u8> {
    frame(msg_type::ADD_OBJECT, seq, 0, |out| {
        out.put_str(attr::OBJPATH, OBJECT_NAME);
        let signature = out.begin(attr::SIGNATURE, false);
        for (method, arguments) in SIGNATURE {
            let table = out.msg_begin(blob::TYPE_TABLE, method);
            for (name, kind) in *arguments {
                out.msg(blob::TYPE_INT32, name, &u32::from(*kind).to_be_bytes());
            }
            out.end(table);
        }
        out.end(signature);
    })
}

/// The body of a change event or notification.
pub fn change_body(change: &ChangeEvent) -> Writer {
    let mut body = Writer::default();
    body.msg_str("key", &change.key);
    match &change.value {
        Some(value) => {
            if json_to_blobmsg(&mut body, Some("value"), value).is_err() {
                // Not JSON (a misbehaving peer), or a string with a NUL
                // that blobmsg cannot carry: the JSON text goes under a
                // name of its own, so no value is mistaken for another.
                body.msg_str("value_json", &stored_json(value.as_bytes()));
            }
        }
        None => body.msg(blob::TYPE_INT8, "deleted", &[1]),
    }
    body.msg_str("origin", &change.origin.to_string());
    body
}

// ------------------------------------------------------------------ methods

/// A stored value as JSON text (see [`driver::StoredValue`]).
fn stored_json(bytes: &[u8]) -> String {
    serde_json::to_string(&driver::StoredValue::of(bytes)).unwrap_or_else(|_| "null".to_owned())
}

/// A method's failure: the status code and a message for the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodError {
    pub status: Status,
    pub message: String,
}

fn invalid(message: impl Into<String>) -> MethodError {
    MethodError {
        status: Status::InvalidArgument,
        message: message.into(),
    }
}

/// The named arguments of a call (the last of duplicate names wins, as in
/// libubox's blobmsg_parse).
struct Args<'a> {
    items: Vec<Msg<'a>>,
}

impl<'a> Args<'a> {
    fn parse(data: &'a [u8]) -> Result<Args<'a>, MethodError> {
        let items = blob::attrs(data)
            .map(|attr| attr.and_then(|attr| attr.msg()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| invalid(format!("malformed arguments: {error:?}")))?;
        Ok(Args { items })
    }

    fn get(&self, name: &str) -> Option<&Msg<'a>> {
        self.items.iter().rev().find(|item| item.name == name)
    }

    /// An argument that is not null: JSON clients (LuCI) send null for
    /// "not given".
    fn given(&self, name: &str) -> Option<&Msg<'a>> {
        self.get(name).filter(|item| item.kind != blob::TYPE_UNSPEC)
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, MethodError> {
        self.given(name)
            .map(|item| {
                item.str()
                    .map_err(|_| invalid(format!("\"{name}\" must be a string")))
            })
            .transpose()
    }

    fn required_string(&self, name: &str) -> Result<&'a str, MethodError> {
        self.string(name)?
            .ok_or_else(|| invalid(format!("missing \"{name}\"")))
    }

    fn count(&self, name: &str) -> Result<Option<usize>, MethodError> {
        self.given(name)
            .map(|item| {
                item.int()
                    .ok()
                    .filter(|&number| item.kind != blob::TYPE_INT8 && number >= 0)
                    .map(|number| usize::try_from(number).unwrap_or(usize::MAX))
                    .ok_or_else(|| invalid(format!("\"{name}\" must be a non-negative integer")))
            })
            .transpose()
    }
}

fn write_error(error: SetError, value_len: usize, driver: &Driver) -> MethodError {
    let message = match &error {
        SetError::Write(WriteError::ValueTooLarge) => format!(
            "value is too large: {value_len} bytes, the limit is {} bytes",
            driver.engine().config().store.value_bytes_max
        ),
        other => other.to_string(),
    };
    let status = match error {
        SetError::Write(WriteError::NotFound) => Status::NotFound,
        SetError::Write(WriteError::StoreFull) => Status::UnknownError,
        _ => Status::InvalidArgument,
    };
    MethodError { status, message }
}

/// Runs one method call against the driver; the reply is JSON text of an
/// object.
pub fn call(driver: &mut Driver, method: &str, data: &[u8]) -> Result<String, MethodError> {
    let args = Args::parse(data)?;
    Ok(match method {
        "get" => {
            let key = args.required_string("key")?;
            let entry = driver
                .engine()
                .store()
                .get(key)
                .filter(|entry| entry.value.is_some())
                .ok_or_else(|| MethodError {
                    status: Status::NotFound,
                    message: format!("key not found: {key}"),
                })?;
            let value = stored_json(entry.value.unwrap_or_default());
            format!(
                "{{\"key\":{},\"value\":{value},\"version\":\"{:016x}\",\"origin\":\"{}\"}}",
                serde_json::Value::from(key),
                entry.version.hlc.0,
                entry.version.origin
            )
        }
        "set" => {
            let key = args.required_string("key")?;
            let value = args
                .get("value")
                .ok_or_else(|| invalid("missing \"value\""))?;
            let mut json = String::new();
            blobmsg_to_json(&mut json, value, 0).map_err(|error| {
                invalid(format!("\"value\" is not representable as JSON: {error:?}"))
            })?;
            driver
                .set(key, &json)
                .map_err(|error| write_error(error, json.len(), driver))?;
            "{}".to_owned()
        }
        "del" => {
            let key = args.required_string("key")?;
            driver
                .delete(key)
                .map_err(|error| write_error(error, 0, driver))?;
            "{}".to_owned()
        }
        "list" => {
            let prefix = args.string("prefix")?.unwrap_or("");
            let offset = args.count("offset")?.unwrap_or(0);
            let limit = args.count("limit")?.unwrap_or(usize::MAX);
            let keys = driver.list(prefix);
            let page: Vec<&String> = keys.iter().skip(offset).take(limit).collect();
            format!(
                "{{\"keys\":{},\"total\":{}}}",
                serde_json::to_string(&page).unwrap_or_else(|_| "[]".to_owned()),
                keys.len()
            )
        }
        "dump" => format!("{{\"entries\":{}}}", driver.dump()),
        "status" => driver.status().to_json(),
        "trigger" => {
            let reason = args.string("reason")?.unwrap_or("manual");
            let reason = control::parse_trigger(reason).ok_or_else(|| {
                invalid(format!(
                    "unknown trigger reason: {reason} (power-on, reconnect, network-up, manual)"
                ))
            })?;
            driver.trigger(reason);
            "{}".to_owned()
        }
        "reload" => {
            driver.reload_keys().map_err(|message| MethodError {
                status: Status::UnknownError,
                message,
            })?;
            "{}".to_owned()
        }
        other => {
            return Err(MethodError {
                status: Status::MethodNotFound,
                message: format!("no method {other}"),
            });
        }
    })
}

// --------------------------------------------------------------- connection

/// Why a connection was dropped, counted in [`Counters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lost {
    Closed,
    Malformed,
    Refused,
    Backlog,
}

/// What the ubus side did, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections made to ubusd (each a new descriptor to wait on).
    pub connects: u64,
    /// Times the object was registered (1 + re-registrations).
    pub registrations: u64,
    /// Connections lost (ubusd exited or closed us).
    pub disconnects: u64,
    /// Messages from ubusd that failed to decode (connection dropped).
    pub malformed: u64,
    /// ubusd refused to register the object (another owner?).
    pub refused: u64,
    /// Connections dropped because ubusd stopped reading.
    pub backlog_drops: u64,
    /// Method calls answered (any status).
    pub calls: u64,
    /// Change events sent.
    pub events: u64,
    /// Changes not sent because the offline backlog was full.
    pub events_dropped: u64,
    /// Replies over [`MESSAGE_BYTES_MAX`], answered with an error instead.
    pub replies_too_large: u64,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    seq: u16,
    /// The seq of our add_object request, once ubusd said hello.
    add_seq: Option<u16>,
    object: Option<u32>,
    registered: bool,
    subscribers: bool,
}

/// The ubus side of the daemon: one connection to ubusd, re-made as needed.
#[derive(Debug)]
pub struct Ubus {
    path: PathBuf,
    conn: Option<Conn>,
    next_attempt: Instant,
    retry_ms: u64,
    /// Whether ubusd was ever reached: only then are changes kept while it
    /// is away.
    seen: bool,
    backlog: VecDeque<ChangeEvent>,
    backlog_bytes: usize,
    counters: Counters,
}

impl Ubus {
    /// A ubus side that connects to `path` from the next [`process`] on.
    ///
    /// [`process`]: Ubus::process
    pub fn new(path: &Path) -> Ubus {
        Ubus {
            path: path.to_owned(),
            conn: None,
            next_attempt: Instant::now(),
            retry_ms: RECONNECT_MS_MIN,
            seen: false,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            counters: Counters::default(),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The object id while the object is registered.
    pub fn object_id(&self) -> Option<u32> {
        self.conn
            .as_ref()
            .filter(|conn| conn.registered)
            .and_then(|conn| conn.object)
    }

    /// Connections made so far: a new one is a new fd to wait on, even
    /// under the number of the last.
    pub fn connects(&self) -> u64 {
        self.counters.connects
    }

    /// The fd to poll (readable, and writable when it wants to write).
    pub fn poll_fd(&self) -> Option<(BorrowedFd<'_>, bool)> {
        self.conn
            .as_ref()
            .map(|conn| (conn.stream.as_fd(), !conn.outbox.is_empty()))
    }

    /// Milliseconds until the next connection attempt, if one is due.
    pub fn timeout_ms(&self) -> Option<u64> {
        self.timeout_ms_at(Instant::now())
    }

    fn timeout_ms_at(&self, now: Instant) -> Option<u64> {
        match self.conn {
            Some(_) => None,
            // Rounded up: 0 while the attempt is not yet due would spin
            // the daemon's wait for up to a millisecond.
            None => Some(
                self.next_attempt
                    .saturating_duration_since(now)
                    .as_nanos()
                    .div_ceil(1_000_000) as u64,
            ),
        }
    }

    /// Connects when due, reads and answers what ubusd sent, writes what is
    /// pending; never blocks. The socket is read only when `readable` (poll
    /// said so), sparing a read that finds nothing on every wake.
    pub fn process(&mut self, driver: &mut Driver, readable: bool) {
        if self.conn.is_none() && Instant::now() >= self.next_attempt {
            self.connect();
        }
        let Some(conn) = &mut self.conn else {
            return;
        };
        let mut dropped = None;
        let mut readable = readable;
        // Only when there is something to read: most wakes are for the
        // group socket, and zeroing the buffer costs about what a datagram
        // does.
        let mut buf = if readable {
            vec![0u8; 16 * 1024]
        } else {
            Vec::new()
        };
        while readable {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    dropped = Some(Lost::Closed);
                    break;
                }
                Ok(len) => {
                    conn.inbox.extend_from_slice(&buf[..len]);
                    // A short read emptied the socket; poll says when more comes.
                    readable = len == buf.len();
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    dropped = Some(Lost::Closed);
                    break;
                }
            }
            if let Err(reason) = conn.handle_inbox(driver, &mut self.counters) {
                dropped = Some(reason);
                break;
            }
        }
        if dropped.is_none() {
            if let Err(reason) = conn.handle_inbox(driver, &mut self.counters) {
                dropped = Some(reason);
            }
        }
        if conn.registered && !self.backlog.is_empty() {
            log::info!(
                "ubus: sending {} change event(s) held while ubusd was away",
                self.backlog.len()
            );
            for change in self.backlog.drain(..) {
                conn.send_change(&change, &mut self.counters);
            }
            self.backlog_bytes = 0;
        }
        if dropped.is_none() {
            dropped = conn.write();
        }
        if let Some(reason) = dropped {
            self.disconnect(reason);
        }
    }

    /// Sends a change as the `gwsync.change` event (and a notification when
    /// the object has subscribers); held while ubusd is away.
    pub fn broadcast(&mut self, change: &ChangeEvent) {
        match &mut self.conn {
            Some(conn) if conn.registered => {
                conn.send_change(change, &mut self.counters);
                if let Some(reason) = conn.write() {
                    // ubusd went away before the daemon noticed: this
                    // change waits for the next one.
                    self.disconnect(reason);
                    self.hold(change);
                }
            }
            _ if self.seen => self.hold(change),
            _ => {}
        }
    }

    /// Keeps a change for when the object is back, oldest dropped first.
    fn hold(&mut self, change: &ChangeEvent) {
        let size_of =
            |change: &ChangeEvent| change.key.len() + change.value.as_ref().map_or(0, String::len);
        let size = size_of(change);
        if size > OFFLINE_BACKLOG_BYTES_MAX {
            self.counters.events_dropped += 1;
            return;
        }
        while self.backlog_bytes + size > OFFLINE_BACKLOG_BYTES_MAX {
            let Some(old) = self.backlog.pop_front() else {
                break;
            };
            self.backlog_bytes -= size_of(&old);
            self.counters.events_dropped += 1;
            log::warn!(
                "ubus: more than {OFFLINE_BACKLOG_BYTES_MAX} bytes of changes while ubusd is away; the event for {} is dropped",
                old.key
            );
        }
        self.backlog_bytes += size;
        self.backlog.push_back(change.clone());
    }

    fn connect(&mut self) {
        let attempt = UnixStream::connect(&self.path).and_then(|stream| {
            stream.set_nonblocking(true)?;
            Ok(stream)
        });
        match attempt {
            Ok(stream) => {
                log::debug!("ubus: connected to {}", self.path.display());
                self.counters.connects += 1;
                self.conn = Some(Conn {
                    stream,
                    inbox: Vec::new(),
                    outbox: Vec::new(),
                    seq: 0,
                    add_seq: None,
                    object: None,
                    registered: false,
                    subscribers: false,
                });
            }
            Err(error) => {
                log::debug!("ubus: {}: {error}", self.path.display());
                self.schedule_retry();
            }
        }
    }

    fn schedule_retry(&mut self) {
        self.next_attempt = Instant::now() + std::time::Duration::from_millis(self.retry_ms);
        self.retry_ms = (self.retry_ms * 2).min(RECONNECT_MS_MAX);
    }

    fn disconnect(&mut self, reason: Lost) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        match reason {
            Lost::Closed => self.counters.disconnects += 1,
            Lost::Malformed => self.counters.malformed += 1,
            Lost::Refused => self.counters.refused += 1,
            Lost::Backlog => self.counters.backlog_drops += 1,
        }
        if conn.registered {
            self.seen = true;
            self.retry_ms = RECONNECT_MS_MIN;
            log::warn!("ubus: connection to ubusd lost ({reason:?}); reconnecting");
        }
        self.schedule_retry();
    }
}

impl Conn {
    fn next_seq(&mut self) -> u16 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn handle_inbox(&mut self, driver: &mut Driver, counters: &mut Counters) -> Result<(), Lost> {
        let mut start = 0;
        let result = loop {
            let rest = &self.inbox[start..];
            let len = match frame_len(rest) {
                Ok(Some(len)) if len <= rest.len() => len,
                Ok(_) => break Ok(()),
                Err(error) => {
                    log::warn!("ubus: malformed message header from ubusd: {error:?}");
                    break Err(Lost::Malformed);
                }
            };
            let frame = rest[..len].to_vec();
            start += len;
            if let Err(reason) = self.handle_message(&frame, driver, counters) {
                break Err(reason);
            }
        };
        self.inbox.drain(..start.min(self.inbox.len()));
        result
    }

    fn handle_message(
        &mut self,
        bytes: &[u8],
        driver: &mut Driver,
        counters: &mut Counters,
    ) -> Result<(), Lost> {
        let (header, fields) = decode(bytes).map_err(|error| {
            log::warn!("ubus: malformed message from ubusd: {error:?}");
            Lost::Malformed
        })?;
        match header.kind {
            msg_type::HELLO if self.add_seq.is_none() => {
                let seq = self.next_seq();
                self.add_seq = Some(seq);
                self.outbox.extend_from_slice(&add_object_message(seq));
            }
            msg_type::DATA if !self.registered && self.add_seq == Some(header.seq) => {
                self.object = fields.objid;
            }
            msg_type::STATUS if !self.registered && self.add_seq == Some(header.seq) => {
                match (fields.status, self.object) {
                    (Some(0), Some(id)) => {
                        self.registered = true;
                        counters.registrations += 1;
                        log::info!(
                            "ubus: object {OBJECT_NAME} registered (id {id:08x}); so far {counters:?}"
                        );
                    }
                    (status, _) => {
                        // Retried every 2 s: logged at the 1st, 2nd, 4th, 8th... time.
                        if (counters.refused + 1).is_power_of_two() {
                            log::error!(
                                "ubus: ubusd refused the object {OBJECT_NAME} (status {status:?}, {} time(s)); is another gwsync running?",
                                counters.refused + 1
                            );
                        }
                        return Err(Lost::Refused);
                    }
                }
            }
            msg_type::INVOKE if self.registered && fields.objid == self.object => {
                counters.calls += 1;
                let method = fields.method.unwrap_or("");
                let result = call(driver, method, fields.data.unwrap_or(&[]));
                if fields.no_reply.unwrap_or(0) == 0 {
                    self.reply(header, result, counters);
                }
            }
            msg_type::NOTIFY if self.registered && fields.objid == self.object => {
                if let Some(active) = fields.active {
                    self.subscribers = active != 0;
                    log::debug!("ubus: subscribers present: {}", self.subscribers);
                }
            }
            msg_type::PING => {
                let reply = frame(msg_type::DATA, header.seq, header.peer, |_| {});
                self.outbox.extend_from_slice(&reply);
            }
            // Status replies to events and notifications: nothing to do.
            _ => {}
        }
        Ok(())
    }

    /// Answers an invoke: a DATA message with the reply (or the error
    /// text), then the STATUS message that completes the call.
    fn reply(&mut self, to: Header, result: Result<String, MethodError>, counters: &mut Counters) {
        let object = self.object.unwrap_or(0);
        let (status, body) = match result {
            Ok(json) => (Status::Ok, json),
            Err(error) => {
                log::debug!("ubus: call failed: {}", error.message);
                (
                    error.status,
                    serde_json::json!({"error": error.message}).to_string(),
                )
            }
        };
        let mut encoded = Writer::default();
        let mut status = status;
        if let Err(why) = json_to_blobmsg(&mut encoded, None, &body) {
            status = Status::UnknownError;
            encoded.msg_str(
                "error",
                &format!("the reply cannot be sent over ubus: {why}"),
            );
        }
        let mut data = frame(msg_type::DATA, to.seq, to.peer, |out| {
            out.put_u32(attr::OBJID, object);
            out.put(attr::DATA, &encoded.buf);
        });
        if data.len() > MESSAGE_BYTES_MAX {
            counters.replies_too_large += 1;
            status = Status::UnknownError;
            let mut short = Writer::default();
            short.msg_str(
                "error",
                &format!(
                    "reply too large for one ubus message ({} bytes, limit {MESSAGE_BYTES_MAX}): page with list offset/limit and get",
                    data.len()
                ),
            );
            data = frame(msg_type::DATA, to.seq, to.peer, |out| {
                out.put_u32(attr::OBJID, object);
                out.put(attr::DATA, &short.buf);
            });
        }
        self.outbox.extend_from_slice(&data);
        self.outbox
            .extend_from_slice(&frame(msg_type::STATUS, to.seq, to.peer, |out| {
                out.put_u32(attr::STATUS, status as u32);
                out.put_u32(attr::OBJID, object);
            }));
    }

    fn send_change(&mut self, change: &ChangeEvent, counters: &mut Counters) {
        let body = change_body(change);
        let seq = self.next_seq();
        let event = frame(msg_type::INVOKE, seq, EVENT_OBJECT, |out| {
            out.put_u32(attr::OBJID, EVENT_OBJECT);
            out.put_str(attr::METHOD, "send");
            let data = out.begin(attr::DATA, false);
            out.msg_str("id", EVENT_CHANGE);
            out.msg(blob::TYPE_TABLE, "data", &body.buf);
            out.end(data);
        });
        if event.len() > MESSAGE_BYTES_MAX {
            counters.events_dropped += 1;
            return;
        }
        self.outbox.extend_from_slice(&event);
        counters.events += 1;
        if let (true, Some(object)) = (self.subscribers, self.object) {
            let seq = self.next_seq();
            let notify = frame(msg_type::NOTIFY, seq, object, |out| {
                out.put_u32(attr::OBJID, object);
                out.put_str(attr::METHOD, "change");
                out.put(attr::DATA, &body.buf);
                out.put(attr::NO_REPLY, &[1]);
            });
            self.outbox.extend_from_slice(&notify);
        }
    }

    fn write(&mut self) -> Option<Lost> {
        while !self.outbox.is_empty() {
            match self.stream.write(&self.outbox) {
                Ok(0) => return Some(Lost::Closed),
                Ok(len) => {
                    self.outbox.drain(..len);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Some(Lost::Closed),
            }
        }
        (self.outbox.len() > OUTBOX_BYTES_MAX).then_some(Lost::Backlog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_body(buf: &[u8]) -> String {
        // A reply body is a table's contents: wrap it to read it back.
        let mut table = Writer::default();
        table.msg(blob::TYPE_TABLE, "", buf);
        let attr = blob::attrs(&table.buf).next().unwrap().unwrap();
        let mut json = String::new();
        blobmsg_to_json(&mut json, &attr.msg().unwrap(), 0).unwrap();
        json
    }

    #[test]
    fn a_reconnect_less_than_a_millisecond_away_is_waited_for_not_polled() {
        // The clock is an argument: under qemu the 500 us can pass between
        // setting the deadline and asking for the timeout.
        let mut ubus = Ubus::new(Path::new("/nonexistent/ubus.sock"));
        let now = Instant::now();
        ubus.next_attempt = now + std::time::Duration::from_micros(500);
        assert_eq!(ubus.timeout_ms_at(now), Some(1));
        assert_eq!(ubus.timeout_ms_at(ubus.next_attempt), Some(0));
        assert_eq!(
            ubus.timeout_ms_at(now + std::time::Duration::from_secs(1)),
            Some(0)
        );
    }

    #[test]
    fn blobmsg_string_golden_bytes_match_libubox() {
        // blobmsg_add_string(&b, "id", "x"): extended, type 3, length 4 +
        // name header (2 + "id" + NUL, padded to 8) + "x\0" = 14.
        let mut out = Writer::default();
        out.msg_str("id", "x");
        assert_eq!(
            out.buf,
            [
                0x83, 0, 0, 14, // extended | STRING << 24 | 14
                0, 2, b'i', b'd', 0, 0, 0, 0, // name length, name, NUL, pad
                b'x', 0, 0, 0, // "x\0", pad
            ]
        );
    }

    #[test]
    fn hello_from_ubusd_decodes() {
        // ubusd_send_hello: type 0, seq 0, peer = client id, empty blob.
        let hello = [0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 4];
        assert_eq!(frame_len(&hello), Ok(Some(12)));
        let (header, fields) = decode(&hello).unwrap();
        assert_eq!(
            header,
            Header {
                kind: msg_type::HELLO,
                seq: 0,
                peer: 0x1234_5678
            }
        );
        assert_eq!(fields, Fields::default());
    }

    #[test]
    fn json_round_trips_through_blobmsg_in_member_order() {
        let json = r#"{"z":1,"a":[true,null,"s",-5,4294967296,1.5],"t":{"n":{}}}"#;
        let mut out = Writer::default();
        json_to_blobmsg(&mut out, None, json).unwrap();
        assert_eq!(parse_body(&out.buf), json);
    }

    #[test]
    fn large_unsigned_numbers_become_doubles_as_in_blobmsg_json() {
        let mut out = Writer::default();
        json_to_blobmsg(&mut out, None, r#"{"n":18446744073709551615}"#).unwrap();
        assert_eq!(parse_body(&out.buf), r#"{"n":1.8446744073709552e+19}"#);
    }

    #[test]
    fn change_events_carry_key_value_origin_or_deleted() {
        let set = ChangeEvent {
            key: "scene/movie".into(),
            value: Some(r#"{"lights":"dim"}"#.into()),
            origin: crate::engine::NodeId(0xab),
        };
        assert_eq!(
            parse_body(&change_body(&set).buf),
            r#"{"key":"scene/movie","value":{"lights":"dim"},"origin":"00000000000000ab"}"#
        );
        let deleted = ChangeEvent { value: None, ..set };
        assert_eq!(
            parse_body(&change_body(&deleted).buf),
            r#"{"key":"scene/movie","deleted":true,"origin":"00000000000000ab"}"#
        );
    }

    #[test]
    fn a_nul_in_a_string_is_refused_and_the_writer_left_as_it_was() {
        let mut out = Writer::default();
        out.msg_str("key", "k");
        let before = out.buf.clone();
        assert!(json_to_blobmsg(&mut out, Some("value"), r#"{"a":["x\u0000y"]}"#).is_err());
        assert_eq!(out.buf, before);
        // An event still says what changed, as JSON text under its own name.
        let change = ChangeEvent {
            key: "k".into(),
            value: Some(r#"{"a":"x\u0000y"}"#.into()),
            origin: crate::engine::NodeId(1),
        };
        assert_eq!(
            parse_body(&change_body(&change).buf),
            r#"{"key":"k","value_json":"{\"a\":\"x\\u0000y\"}","origin":"0000000000000001"}"#
        );
    }

    #[test]
    fn lengths_that_overrun_their_container_are_refused() {
        // An attribute claiming 8 bytes inside a 6-byte buffer.
        let bad = [0x83, 0, 0, 8, 0, 0];
        assert_eq!(blob::attrs(&bad).next(), Some(Err(blob::Error::Length)));
        // A header below its own size.
        assert_eq!(
            blob::attrs(&[0, 0, 0, 3]).next(),
            Some(Err(blob::Error::Length))
        );
        // A name length past the attribute.
        let mut out = Writer::default();
        out.msg_str("key", "v");
        out.buf[5] = 200;
        let attr = blob::attrs(&out.buf).next().unwrap().unwrap();
        assert_eq!(attr.msg(), Err(blob::Error::Name));
        // A message bigger than ubusd allows.
        let huge = [0, 2, 0, 1, 0, 0, 0, 1, 0x00, 0x20, 0x00, 0x00];
        assert_eq!(frame_len(&huge), Err(DecodeError::Length));
        assert_eq!(
            frame_len(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4]),
            Err(DecodeError::Version)
        );
    }

    #[test]
    fn deep_nesting_is_refused_not_recursed() {
        let mut inner = Writer::default();
        inner.msg(blob::TYPE_UNSPEC, "", &[]);
        for _ in 0..NESTING_DEPTH_MAX + 1 {
            let mut outer = Writer::default();
            outer.msg(blob::TYPE_ARRAY, "", &inner.buf);
            inner = outer;
        }
        let attr = blob::attrs(&inner.buf).next().unwrap().unwrap();
        let mut json = String::new();
        assert_eq!(
            blobmsg_to_json(&mut json, &attr.msg().unwrap(), 0),
            Err(blob::Error::Depth)
        );
    }

    #[test]
    fn doubles_json_cannot_say_are_refused() {
        let mut out = Writer::default();
        out.msg(blob::TYPE_DOUBLE, "v", &f64::NAN.to_bits().to_be_bytes());
        let attr = blob::attrs(&out.buf).next().unwrap().unwrap();
        let mut json = String::new();
        assert_eq!(
            blobmsg_to_json(&mut json, &attr.msg().unwrap(), 0),
            Err(blob::Error::Payload)
        );
    }

    #[test]
    fn add_object_lists_every_method_in_its_signature() {
        let message = add_object_message(7);
        let (header, _) = decode(&message).unwrap();
        assert_eq!(header.kind, msg_type::ADD_OBJECT);
        assert_eq!(header.seq, 7);
        let signature = blob::attrs(&message[12..])
            .map(Result::unwrap)
            .find(|attr| attr.id == attr::SIGNATURE)
            .unwrap();
        let names: Vec<&str> = blob::attrs(signature.payload)
            .map(|attr| attr.unwrap().msg().unwrap().name)
            .collect();
        assert_eq!(
            names,
            [
                "get", "set", "del", "list", "dump", "status", "trigger", "reload"
            ]
        );
    }

    #[test]
    fn changes_held_while_ubusd_is_away_are_bounded_oldest_dropped_first() {
        let mut ubus = Ubus::new(Path::new("/nonexistent/ubus.sock"));
        let change = |index: usize| ChangeEvent {
            key: format!("k{index}"),
            value: Some(format!("\"{}\"", "x".repeat(60 * 1024))),
            origin: crate::engine::NodeId(1),
        };
        // Never connected: nothing is kept (plain Linux without ubusd).
        ubus.broadcast(&change(0));
        assert!(ubus.backlog.is_empty());
        ubus.seen = true;
        for index in 0..10 {
            ubus.broadcast(&change(index));
        }
        assert!(ubus.backlog_bytes <= OFFLINE_BACKLOG_BYTES_MAX);
        assert_eq!(ubus.backlog.len(), 4);
        assert_eq!(ubus.backlog.front().map(|c| c.key.as_str()), Some("k6"));
        assert_eq!(ubus.counters().events_dropped, 6);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Well-formed messages with random attributes, then bytes flipped,
        /// cut or appended: the decoder and the JSON conversion must return,
        /// never panic.
        fn message_bytes() -> impl Strategy<Value = Vec<u8>> {
            (
                any::<u8>(),
                proptest::collection::vec(
                    (0u8..16, proptest::collection::vec(any::<u8>(), 0..40)),
                    0..6,
                ),
                proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
                any::<Option<usize>>(),
            )
                .prop_map(|(kind, attrs, flips, cut)| {
                    let mut bytes = frame(kind % 12, 1, 2, |out| {
                        for (id, payload) in &attrs {
                            if id % 2 == 0 {
                                out.put(*id, payload);
                            } else {
                                out.msg(*id % 9, "k", payload);
                            }
                        }
                    });
                    for (at, byte) in flips {
                        let len = bytes.len();
                        bytes[at % len] ^= byte;
                    }
                    if let Some(cut) = cut {
                        bytes.truncate(cut % (bytes.len() + 1));
                    }
                    bytes
                })
        }

        /// JSON values blobmsg can carry: no NUL in strings, integers in
        /// `i64`, finite doubles.
        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            use serde_json::Value;
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |x| x.is_finite())
                    .prop_map(Value::from),
                "[^\\x00]{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                    proptest::collection::btree_map("[^\\x00]{0,6}", inner, 0..6)
                        .prop_map(|map| Value::Object(map.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn decoding_never_panics(bytes in message_bytes()) {
                if let Ok(Some(len)) = frame_len(&bytes) {
                    if let Some(frame) = bytes.get(..len) {
                        if let Ok((_, fields)) = decode(frame) {
                            if let Some(data) = fields.data {
                                let _ = Args::parse(data);
                                for attr in blob::attrs(data).flatten() {
                                    if let Ok(msg) = attr.msg() {
                                        let mut json = String::new();
                                        if blobmsg_to_json(&mut json, &msg, 0).is_ok() {
                                            prop_assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }

            #[test]
            fn json_survives_blobmsg_and_back(value in json_value()) {
                let text = value.to_string();
                let mut out = Writer::default();
                json_to_blobmsg(&mut out, Some("v"), &text).unwrap();
                let attr = blob::attrs(&out.buf).next().unwrap().unwrap();
                let mut back = String::new();
                blobmsg_to_json(&mut back, &attr.msg().unwrap(), 0).unwrap();
                // Exact up to serde_json's own reading of the text (its
                // default float parser may miss the last bit).
                let read: serde_json::Value = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(back, read.to_string());
            }

            #[test]
            fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = frame_len(&bytes);
                let _ = decode(&bytes);
                for attr in blob::attrs(&bytes).flatten() {
                    if let Ok(msg) = attr.msg() {
                        let mut json = String::new();
                        let _ = blobmsg_to_json(&mut json, &msg, 0);
                    }
                }
            }
        }
    }
}
