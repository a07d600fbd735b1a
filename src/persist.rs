//! The state directory: node id, clock high-water mark and entries.
//!
//! The state lives on a router's flash, so:
//! - every write is atomic (temp file, fsync, rename, fsync of the folder):
//!   a power cut leaves either the old or the new file, never half of one;
//! - writes are debounced by the driver ([`Debounce`]): at most one per
//!   interval in a burst, and always one on close;
//! - a state file that does not parse at start is moved aside (renamed to
//!   `state.json.corrupt-<unix seconds>`, never deleted) with a clear log
//!   line, and the gateway starts empty and resyncs from its peers.
//!
//! Files:
//! - `node_id`: 16 hex digits. Kept apart from the entries so that a corrupt
//!   state file does not also change the gateway's identity.
//! - `state.json`:
//!
//! ```text
//! {"format":1,"node_id":"<hex>","clock":<hlc>,"entries":[
//!  {"k":"<key>","t":<hlc>,"o":"<origin hex>","v":<value JSON>},
//!  {"k":"<key>","t":<hlc>,"o":"<origin hex>","d":1},            tombstone
//!  {"k":"<key>","t":<hlc>,"o":"<origin hex>","b":"<hex bytes>"}  not JSON
//! ]}
//! ```
//!
//! Values are JSON already and are written as they are, so the file stays
//! readable. A value that came from the network is opaque to the engine
//! and may not be JSON, or be JSON with surrounding whitespace that a JSON
//! reader would drop (changing the digest the gateways agree on); such a
//! value is kept as hex bytes (`b`) instead, byte for byte. The file and
//! the node id are written mode 0600 whatever the umask.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::engine::clock::{Hlc, Version};
use crate::engine::store::{Entry, Store};
use crate::engine::{Engine, NodeId};

const STATE_FILE: &str = "state.json";
const NODE_ID_FILE: &str = "node_id";
const FORMAT: u32 = 1;

/// Why the state directory could not be used.
#[derive(Debug)]
pub enum PersistError {
    /// The directory could not be created or read.
    Dir(PathBuf, io::Error),
    /// A file could not be written (full flash, read-only mount).
    Write(PathBuf, io::Error),
    /// The directory is not private enough to hold the data (why).
    Unsafe(PathBuf, String),
}

impl fmt::Display for PersistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PersistError::Dir(path, error) => {
                write!(f, "state directory {}: {error}", path.display())
            }
            PersistError::Write(path, error) => write!(f, "writing {}: {error}", path.display()),
            PersistError::Unsafe(path, why) => {
                write!(f, "state directory {}: {why}", path.display())
            }
        }
    }
}

impl std::error::Error for PersistError {}

/// What was found in the state directory at start.
#[derive(Debug)]
pub enum Loaded {
    /// No state file: a first start.
    Empty,
    /// The saved state.
    State {
        clock: Hlc,
        entries: Vec<(String, Entry)>,
    },
    /// The state file did not parse and was moved to `moved_to`.
    Corrupt { reason: String, moved_to: PathBuf },
}

/// A state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Uses (and creates, mode 0700) a state directory. One that other
    /// users may write to is refused (they could swap our files); one they
    /// may read or enter is made 0700, and that is logged. Files inside are
    /// always written 0600.
    pub fn open(dir: &Path) -> Result<StateDir, PersistError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|error| PersistError::Dir(dir.to_owned(), error))?;
        check_dir_not_writable_by_others(dir, false)
            .map_err(|why| PersistError::Unsafe(dir.to_owned(), why))?;
        let meta = fs::metadata(dir).map_err(|error| PersistError::Dir(dir.to_owned(), error))?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 && meta.uid() == nix::unistd::geteuid().as_raw() {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|error| PersistError::Dir(dir.to_owned(), error))?;
            log::warn!(
                "state directory {} had mode {mode:04o}; made it 0700 so only its owner can \
                 read the data",
                dir.display()
            );
        }
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The persisted node id; `None` when absent or unreadable (a new one is
    /// then chosen, which is harmless: versions name their own origin).
    pub fn load_node_id(&self) -> Option<NodeId> {
        let text = fs::read_to_string(self.dir.join(NODE_ID_FILE)).ok()?;
        let id = text.trim().parse::<NodeId>().ok()?;
        Some(id)
    }

    pub fn save_node_id(&self, id: NodeId) -> Result<(), PersistError> {
        self.write_atomic(NODE_ID_FILE, |out| writeln!(out, "{id}"))
    }

    /// Reads the state file. A file that does not parse is moved aside.
    pub fn load(&self) -> Loaded {
        let path = self.state_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Loaded::Empty,
            Err(error) => return self.move_aside(&path, format!("unreadable: {error}")),
        };
        match parse_state(&bytes) {
            Ok((clock, entries)) => Loaded::State { clock, entries },
            Err(reason) => {
                drop(bytes);
                self.move_aside(&path, reason)
            }
        }
    }

    fn move_aside(&self, path: &Path, reason: String) -> Loaded {
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let moved_to = self.dir.join(format!("{STATE_FILE}.corrupt-{seconds}"));
        if let Err(error) = fs::rename(path, &moved_to) {
            log::error!("could not move corrupt {} aside: {error}", path.display());
        }
        Loaded::Corrupt { reason, moved_to }
    }

    /// Writes the engine's state atomically.
    pub fn save(&self, engine: &Engine) -> Result<(), PersistError> {
        self.write_atomic(STATE_FILE, |out| write_state(out, engine))
    }

    fn write_atomic(
        &self,
        name: &str,
        fill: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>,
    ) -> Result<(), PersistError> {
        let path = self.dir.join(name);
        let temp = self.dir.join(format!("{name}.tmp"));
        let result = (|| {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            // A temp file left by a crash may have another mode: start anew.
            let _ = fs::remove_file(&temp);
            let file = File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)?;
            // 0600 whatever the umask (which can only remove bits anyway).
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            let mut out = BufWriter::new(&file);
            fill(&mut out)?;
            out.flush()?;
            drop(out);
            file.sync_all()?;
            fs::rename(&temp, &path)?;
            // The rename is durable only once the folder is.
            File::open(&self.dir)?.sync_all()
        })();
        result.map_err(|error| {
            let _ = fs::remove_file(&temp);
            PersistError::Write(path, error)
        })
    }
}

/// Refuses a directory that users other than its owner (and root) may
/// write into: anyone who can, can replace our files or our socket. A
/// sticky directory (/tmp) is allowed when `sticky_ok`: there others can
/// add names but not replace ours.
pub fn check_dir_not_writable_by_others(dir: &Path, sticky_ok: bool) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    let uid = nix::unistd::geteuid().as_raw();
    let mode = meta.mode();
    let others_write = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(format!(
            "{} belongs to uid {}, not to us (uid {uid}) or root: refusing to use it",
            dir.display(),
            meta.uid()
        ));
    }
    if others_write && !(sticky_ok && sticky) {
        return Err(format!(
            "{} is writable by other users (mode {:04o}): they could replace gwsync's files; \
             chmod go-w it or choose another directory",
            dir.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// The file's head; the entries follow one per line, so a state file stays
/// readable (and diffable) by a person.
#[derive(Serialize)]
struct StateHead {
    format: u32,
    node_id: String,
    clock: u64,
}

/// One entry as written; the shape [`StateEntry`] reads back.
#[derive(Serialize)]
struct StateEntryOut<'a> {
    k: &'a str,
    t: u64,
    o: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    v: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    d: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    b: Option<String>,
}

fn write_state(out: &mut impl Write, engine: &Engine) -> io::Result<()> {
    let head = serde_json::to_string(&StateHead {
        format: FORMAT,
        node_id: engine.node_id().to_string(),
        clock: engine.clock_high_water().0,
    })?;
    // `{"format":1,...,"clock":N}` opened up to take the entries array.
    out.write_all(&head.as_bytes()[..head.len() - 1])?;
    out.write_all(b",\"entries\":[")?;
    write_entries(out, engine.store())?;
    out.write_all(b"\n]}\n")
}

fn write_entries(out: &mut impl Write, store: &Store) -> io::Result<()> {
    for (index, (key, entry)) in store.iter().enumerate() {
        out.write_all(if index == 0 { b"\n" } else { b",\n" })?;
        // Written as JSON only when reading it back gives the same bytes: a
        // peer's value with surrounding whitespace would lose it, and with
        // it the digest the other gateways agree on.
        let json = entry.value.and_then(|value| {
            serde_json::from_slice::<&RawValue>(value)
                .ok()
                .filter(|raw| raw.get().as_bytes() == value)
        });
        let line = StateEntryOut {
            k: key,
            t: entry.version.hlc.0,
            o: entry.version.origin.to_string(),
            v: json,
            d: entry.value.is_none().then_some(1),
            // Not JSON as is (only a misbehaving peer sends that): hex.
            b: match (entry.value, json) {
                (Some(value), None) => Some(crate::hex::encode(value)),
                _ => None,
            },
        };
        serde_json::to_writer(&mut *out, &line)?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct StateFile<'a> {
    format: u32,
    clock: u64,
    #[serde(borrow)]
    entries: Vec<StateEntry<'a>>,
}

#[derive(Deserialize)]
struct StateEntry<'a> {
    k: String,
    t: u64,
    o: &'a str,
    #[serde(default, borrow)]
    v: Option<&'a RawValue>,
    #[serde(default)]
    d: u8,
    #[serde(default)]
    b: Option<&'a str>,
}

fn parse_state(bytes: &[u8]) -> Result<(Hlc, Vec<(String, Entry)>), String> {
    let file: StateFile = serde_json::from_slice(bytes).map_err(|error| error.to_string())?;
    if file.format != FORMAT {
        return Err(format!("unknown format {}", file.format));
    }
    let mut entries = Vec::with_capacity(file.entries.len());
    for entry in file.entries {
        let origin = entry
            .o
            .parse::<NodeId>()
            .map_err(|_| format!("bad origin {:?} for key {:?}", entry.o, entry.k))?;
        let value = entry_value(&entry.k, entry.v, entry.d, entry.b)?;
        let version = Version {
            hlc: Hlc(entry.t),
            origin,
        };
        entries.push((entry.k, Entry { version, value }));
    }
    Ok((Hlc(file.clock), entries))
}

fn entry_value(
    key: &str,
    v: Option<&RawValue>,
    d: u8,
    b: Option<&str>,
) -> Result<Option<Box<[u8]>>, String> {
    Ok(if d != 0 {
        None
    } else if let Some(hex) = b {
        Some(
            crate::hex::decode(hex)
                .ok_or_else(|| format!("bad hex value for key {key:?}"))?
                .into(),
        )
    } else {
        // `"v":null` deserialises as no value; it was a JSON null.
        Some(v.map_or("null", RawValue::get).as_bytes().into())
    })
}

/// One entry of a `load` request: a state file's entry, whose version
/// (`t` and `o`) may be missing when it came from a plain `dump`.
#[derive(Deserialize)]
struct LoadEntry<'a> {
    k: String,
    #[serde(default)]
    t: Option<u64>,
    #[serde(default)]
    o: Option<&'a str>,
    #[serde(default, borrow)]
    v: Option<&'a RawValue>,
    #[serde(default)]
    d: u8,
    #[serde(default)]
    b: Option<&'a str>,
}

/// An entry to load: key, version if known, value (`None`: a tombstone).
pub type Loadable = (String, Option<Version>, Option<Box<[u8]>>);

/// Parses the entries of a `load` request (a JSON array in the state
/// file's entry format; `t` and `o` optional).
pub fn parse_load_entries(json: &str) -> Result<Vec<Loadable>, String> {
    let entries: Vec<LoadEntry> = serde_json::from_str(json).map_err(|error| error.to_string())?;
    entries
        .into_iter()
        .map(|entry| {
            let version = match (entry.t, entry.o) {
                (Some(t), Some(o)) => Some(Version {
                    hlc: Hlc(t),
                    origin: o
                        .parse::<NodeId>()
                        .map_err(|_| format!("bad origin {o:?} for key {:?}", entry.k))?,
                }),
                (None, None) => None,
                _ => return Err(format!("key {:?}: \"t\" and \"o\" go together", entry.k)),
            };
            let value = entry_value(&entry.k, entry.v, entry.d, entry.b)?;
            Ok((entry.k, version, value))
        })
        .collect()
}

/// When to write: at most once per `interval_ms` while changes keep coming.
#[derive(Debug, Clone)]
pub struct Debounce {
    pub interval_ms: u64,
    written_generation: u64,
    last_write: Option<u64>,
}

impl Debounce {
    pub fn new(interval_ms: u64, written_generation: u64) -> Debounce {
        Debounce {
            interval_ms,
            written_generation,
            last_write: None,
        }
    }

    /// When the next write is due, if there is anything to write.
    pub fn due(&self, generation: u64) -> Option<u64> {
        if generation == self.written_generation {
            return None;
        }
        Some(self.last_write.map_or(0, |last| last + self.interval_ms))
    }

    pub fn written(&mut self, now: u64, generation: u64) {
        self.written_generation = generation;
        self.last_write = Some(now);
    }

    /// A write failed: try again one interval after `now`, still owing
    /// everything since the last write that worked.
    pub fn failed(&mut self, now: u64) {
        self.last_write = Some(now);
    }

    /// The state generation the last successful write saved.
    pub fn written_generation(&self) -> u64 {
        self.written_generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Config;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gwsync-persist-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn state_round_trips_values_tombstones_null_and_non_json_bytes() {
        let dir = temp_dir("roundtrip");
        let state = StateDir::open(&dir).unwrap();
        let mut engine = Engine::new(Config::default(), NodeId(0xab), 1, 0);
        engine.set(0, 1_000, "a", br#"{"on":true}"#).unwrap();
        engine.set(0, 1_001, "null", b"null").unwrap();
        engine.set(0, 1_002, "gone", b"1").unwrap();
        engine.delete(0, 1_003, "gone").unwrap();
        engine.set(0, 1_004, "raw", b"\xff not json \"").unwrap();
        // Quotes and backslashes need escaping in the file (control
        // characters are refused in keys).
        engine.set(0, 1_005, "we\"ird\\key", b"[1, 2]").unwrap();
        engine.set(0, 1_006, "spaced", b" 1 ").unwrap();
        state.save(&engine).unwrap();
        let Loaded::State { clock, entries } = state.load() else {
            panic!("state did not load");
        };
        assert_eq!(clock, engine.clock_high_water());
        let mut restored = Engine::new(Config::default(), NodeId(0xcd), 2, 0);
        restored.restore(clock, entries);
        assert_eq!(restored.store().digest(), engine.store().digest());
        assert_eq!(restored.get("null"), Some(&b"null"[..]));
        assert_eq!(restored.get("gone"), None);
        assert!(restored.store().get("gone").unwrap().is_tombstone());
        assert_eq!(restored.get("raw"), Some(&b"\xff not json \""[..]));
        // A peer's value is kept byte for byte, whitespace included.
        assert_eq!(restored.get("spaced"), Some(&b" 1 "[..]));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_state_is_moved_aside_not_deleted() {
        let dir = temp_dir("corrupt");
        let state = StateDir::open(&dir).unwrap();
        let mut engine = Engine::new(Config::default(), NodeId(1), 1, 0);
        engine.set(0, 1_000, "a", b"1").unwrap();
        state.save(&engine).unwrap();
        let bytes = fs::read(state.state_path()).unwrap();
        fs::write(state.state_path(), &bytes[..bytes.len() / 2]).unwrap();
        let Loaded::Corrupt { moved_to, .. } = state.load() else {
            panic!("truncated state was accepted");
        };
        assert_eq!(fs::read(&moved_to).unwrap(), &bytes[..bytes.len() / 2]);
        assert!(matches!(state.load(), Loaded::Empty));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn node_id_round_trips() {
        let dir = temp_dir("node");
        let state = StateDir::open(&dir).unwrap();
        assert_eq!(state.load_node_id(), None);
        state.save_node_id(NodeId(0x0123_4567_89ab_cdef)).unwrap();
        assert_eq!(state.load_node_id(), Some(NodeId(0x0123_4567_89ab_cdef)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debounce_writes_at_once_then_at_most_once_per_interval() {
        let mut debounce = Debounce::new(2_000, 0);
        assert_eq!(debounce.due(0), None);
        assert_eq!(debounce.due(1), Some(0));
        debounce.written(100, 1);
        assert_eq!(debounce.due(1), None);
        assert_eq!(debounce.due(5), Some(2_100));
    }
}
