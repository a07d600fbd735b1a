//! The group key: datagram encryption and authentication, and replay
//! protection (DESIGN section 5).
//!
//! # Why XChaCha20-Poly1305 with random nonces
//!
//! Routers are 32-bit MIPS and ARM without AES instructions, where ChaCha20
//! is several times faster than software AES, and RustCrypto's
//! implementation is pure Rust (no C, no assembly), so it builds for every
//! OpenWrt target. Gateways share one key and never talk to each other
//! before sending, so there is no counter they could agree on: the 192-bit
//! nonce of the X variant is large enough to draw at random for every
//! datagram (a collision is expected after about 2^96 datagrams).
//!
//! # Sealed datagram layout
//!
//! ```text
//!  0  header      24 bytes, as in crate::wire, flags bit 0 set and the
//!                 sealing key's id in byte 5; associated data, so a changed
//!                 sender, boot, sequence or type fails the tag
//! 24  nonce       24 bytes, random
//! 48  ciphertext  as long as the payload
//!  .. tag         16 bytes, Poly1305
//! ```
//!
//! [`SEAL_OVERHEAD`] (40 bytes) is what encryption adds to a datagram.
//!
//! # Randomness
//!
//! [`Keyring::seal`] takes the nonce generator as an argument, because the
//! engine takes all its randomness from a seed so the simulator can replay a
//! run. The daemon must pass a `StdRng` (ChaCha12) seeded from the OS with
//! its full 256-bit seed (`StdRng::from_os_rng()`), never `seed_from_u64`:
//! with a 64-bit seed two gateways (or two boots) could start the same
//! nonce stream and reuse nonces under the shared key.
//!
//! # Replays
//!
//! [`ReplayWindow`] is the anti-replay window of IPsec (RFC 4303 section
//! 3.4.3) and WireGuard: the highest sequence seen and a 64-bit bitmap below
//! it. gwsync's sequence numbers restart at every boot under a random boot
//! id, which cannot be ordered, so a new boot id is accepted and the last few
//! boot ids are remembered as retired, so replaying a previous boot's
//! datagrams does not re-open it.

use std::fmt;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::{CryptoRng, TryRngCore};
use zeroize::Zeroize;

use crate::wire::{self, HEADER_LEN, Packet};

/// Length of a group key.
pub const KEY_LEN: usize = 32;
/// Length of the random nonce that follows the header.
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag at the end.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed datagram has beyond the plain one; set the engine's
/// `Config::seal_overhead_bytes` to this when keyed.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Where a sealed datagram's (encrypted) payload starts: after the header
/// and the nonce.
pub const SEALED_PAYLOAD_OFFSET: usize = HEADER_LEN + NONCE_LEN;
/// The key id of an unencrypted datagram; no key ever has it.
pub const NO_KEY_ID: u8 = 0;
/// Keys a [`Keyring`] holds: the one sent with and the one it replaces.
pub const KEYRING_KEYS_MAX: usize = 2;
/// Largest key file read; a key is under 100 bytes of text.
pub const KEY_FILE_BYTES_MAX: u64 = 4096;
/// Sequences below the highest seen that may still arrive reordered.
pub const REPLAY_WINDOW_LEN: u32 = 64;
/// Previous boot ids of one sender whose datagrams are refused.
pub const RETIRED_BOOTS_MAX: usize = 4;

/// Associated data of the key-id derivation. Never a datagram header (those
/// start with the magic), so the derivation cannot be confused with a seal.
const KEY_ID_CONTEXT: &[u8] = b"gwsync key id v1";

/// A 32-byte group key shared by every gateway of one group.
///
/// Debug output shows only the key id and fingerprint; the bytes are zeroed
/// when the key is dropped.
#[derive(Clone)]
pub struct GroupKey {
    bytes: [u8; KEY_LEN],
}

impl GroupKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> GroupKey {
        GroupKey { bytes }
    }

    /// A new random key from the operating system (`gwsync genkey`).
    pub fn generate() -> io::Result<GroupKey> {
        let mut bytes = [0; KEY_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(io::Error::other)?;
        Ok(GroupKey { bytes })
    }

    /// A key drawn from `rng`, for simulations and tests that must replay.
    pub fn from_rng<R: CryptoRng + ?Sized>(rng: &mut R) -> GroupKey {
        let mut bytes = [0; KEY_LEN];
        rng.fill_bytes(&mut bytes);
        GroupKey { bytes }
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// The 64 lowercase hex digits `gwsync genkey` prints and key files hold.
    pub fn to_hex(&self) -> String {
        crate::hex::encode(&self.bytes)
    }

    /// The key's id in datagram headers: 1..=255, derived from the key so
    /// every gateway with the same key agrees on it without configuration.
    pub fn id(&self) -> u8 {
        1 + self.derive()[0] % 255
    }

    /// Eight bytes that name the key in logs and `status`, so an operator can
    /// compare keys on two gateways without showing them.
    pub fn fingerprint(&self) -> [u8; 8] {
        let derived = self.derive();
        let mut out = [0; 8];
        out.copy_from_slice(&derived[8..]);
        out
    }

    /// A pseudo-random function of the key: the Poly1305 tag of an empty
    /// message under a nonce that no seal uses with any real chance. It
    /// reuses the AEAD so no hash crate is linked into the router binary.
    fn derive(&self) -> [u8; TAG_LEN] {
        let cipher = XChaCha20Poly1305::new(&self.bytes.into());
        let nonce = XNonce::from([0xff; NONCE_LEN]);
        cipher
            .encrypt_in_place_detached(&nonce, KEY_ID_CONTEXT, &mut [])
            .expect("an empty message is within the AEAD's length limit")
            .into()
    }
}

impl Drop for GroupKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl PartialEq for GroupKey {
    fn eq(&self, other: &GroupKey) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for GroupKey {}

impl fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fingerprint = crate::hex::encode(&self.fingerprint());
        write!(f, "GroupKey(id {}, fingerprint {fingerprint})", self.id())
    }
}

/// Why text is not a group key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyParseError {
    /// Neither 64 hex digits nor 43 base64 characters (44 with `=`).
    WrongLength,
    /// A character outside the hex or base64 alphabet, or base64 whose
    /// unused low bits are not zero.
    BadCharacter,
    /// All 32 bytes are zero: a placeholder left in a config, not a key.
    AllZero,
}

impl fmt::Display for KeyParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyParseError::WrongLength => "a key is 64 hex digits or 44 base64 characters",
            KeyParseError::BadCharacter => "the key holds a character that is not hex or base64",
            KeyParseError::AllZero => "the key is all zeros",
        })
    }
}

impl std::error::Error for KeyParseError {}

impl FromStr for GroupKey {
    type Err = KeyParseError;

    /// Hex (either case) or base64 (standard or URL-safe alphabet, padding
    /// optional), with any surrounding whitespace.
    fn from_str(text: &str) -> Result<GroupKey, KeyParseError> {
        let text = text.trim().as_bytes();
        let bytes = match text.len() {
            64 => parse_hex(text)?,
            43 => parse_base64(text)?,
            44 if text[43] == b'=' => parse_base64(&text[..43])?,
            _ => return Err(KeyParseError::WrongLength),
        };
        if bytes == [0; KEY_LEN] {
            return Err(KeyParseError::AllZero);
        }
        Ok(GroupKey { bytes })
    }
}

fn parse_hex(text: &[u8]) -> Result<[u8; KEY_LEN], KeyParseError> {
    crate::hex::decode_array(text).ok_or(KeyParseError::BadCharacter)
}

/// 43 characters carry 258 bits: 256 of key and 2 that must be zero, so
/// every key has exactly one spelling.
fn parse_base64(text: &[u8]) -> Result<[u8; KEY_LEN], KeyParseError> {
    fn sextet(c: u8) -> Result<u32, KeyParseError> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return Err(KeyParseError::BadCharacter),
        } as u32)
    }
    let mut out = [0; KEY_LEN];
    let mut acc: u32 = 0;
    let mut bits = 0;
    let mut written = 0;
    for &c in text {
        acc = acc << 6 | sextet(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            if written < KEY_LEN {
                out[written] = (acc >> bits) as u8;
                written += 1;
            }
            acc &= (1 << bits) - 1;
        }
    }
    if written != KEY_LEN || acc != 0 {
        return Err(KeyParseError::BadCharacter);
    }
    Ok(out)
}

/// Why a key file gave no key.
#[derive(Debug)]
pub enum KeyFileError {
    /// It could not be opened or read.
    Io(io::Error),
    /// It is larger than [`KEY_FILE_BYTES_MAX`]: not a key file.
    TooLarge,
    /// Line `line` (from 1) is not a key.
    Parse { line: usize, error: KeyParseError },
    /// It holds no key, or more than [`KEYRING_KEYS_MAX`].
    KeyCount(usize),
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyFileError::Io(error) => write!(f, "cannot read the key file: {error}"),
            KeyFileError::TooLarge => write!(f, "the key file is over {KEY_FILE_BYTES_MAX} bytes"),
            KeyFileError::Parse { line, error } => write!(f, "bad key on line {line}: {error}"),
            KeyFileError::KeyCount(count) => write!(
                f,
                "the key file holds {count} keys; it holds 1 or {KEYRING_KEYS_MAX} \
                 (one per line: the key to send with, then the other key accepted)"
            ),
        }
    }
}

impl std::error::Error for KeyFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KeyFileError::Io(error) => Some(error),
            KeyFileError::Parse { error, .. } => Some(error),
            KeyFileError::TooLarge | KeyFileError::KeyCount(_) => None,
        }
    }
}

/// Something about a key file that works but should be fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFileWarning {
    /// Group or others may read it (`mode` holds the permission bits).
    ReadableByOthers { mode: u32 },
}

impl fmt::Display for KeyFileWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyFileWarning::ReadableByOthers { mode } => write!(
                f,
                "the key file has mode {mode:04o}: others than its owner may read the group key (chmod 600)"
            ),
        }
    }
}

/// Parses the text of a key file: one key per line (the text
/// [`GroupKey::from_str`] accepts), 1 or [`KEYRING_KEYS_MAX`] of them; blank
/// lines and lines starting with `#` are ignored. The first key is the one
/// sent with; a second one is accepted too, which is what lets a group
/// rotate keys one gateway at a time.
pub fn parse_keys(text: &str) -> Result<Vec<GroupKey>, KeyFileError> {
    let mut keys = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if keys.len() == KEYRING_KEYS_MAX {
            return Err(KeyFileError::KeyCount(keys.len() + 1));
        }
        let key = GroupKey::from_str(line).map_err(|error| KeyFileError::Parse {
            line: index + 1,
            error,
        })?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(KeyFileError::KeyCount(0));
    }
    Ok(keys)
}

/// Reads a key file (see [`parse_keys`]). The keys are still returned when
/// the file is too open; the caller logs the warning.
pub fn load_key_file(path: &Path) -> Result<(Vec<GroupKey>, Option<KeyFileWarning>), KeyFileError> {
    let file = std::fs::File::open(path).map_err(KeyFileError::Io)?;
    let warning = mode_warning(&file.metadata().map_err(KeyFileError::Io)?);
    let mut text = Vec::new();
    file.take(KEY_FILE_BYTES_MAX + 1)
        .read_to_end(&mut text)
        .map_err(KeyFileError::Io)?;
    if text.len() as u64 > KEY_FILE_BYTES_MAX {
        text.zeroize();
        return Err(KeyFileError::TooLarge);
    }
    let parsed = match std::str::from_utf8(&text) {
        Ok(text) => parse_keys(text),
        Err(_) => Err(KeyFileError::Parse {
            line: 1,
            error: KeyParseError::BadCharacter,
        }),
    };
    text.zeroize();
    Ok((parsed?, warning))
}

/// The keyring of 1 or 2 keys in key-file order: the first seals.
pub fn keyring_of(keys: &[GroupKey]) -> Option<Keyring> {
    match keys {
        [] => None,
        [primary] => Some(Keyring::new(primary)),
        [primary, secondary, ..] => Some(Keyring::with_secondary(primary, secondary)),
    }
}

#[cfg(unix)]
fn mode_warning(metadata: &std::fs::Metadata) -> Option<KeyFileWarning> {
    use std::os::unix::fs::PermissionsExt;
    let mode = metadata.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then_some(KeyFileWarning::ReadableByOthers { mode })
}

#[cfg(not(unix))]
fn mode_warning(_metadata: &std::fs::Metadata) -> Option<KeyFileWarning> {
    None
}

/// Why a datagram could not be opened. Like every network error it is for
/// counting (see [`CryptoError::name`]), never for the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CryptoError {
    /// Shorter than a header, a nonce and a tag (`sealed_truncated`, apart
    /// from the wire's `truncated`).
    Truncated,
    /// The encrypted flag is clear: sent by a gateway with no key.
    NotEncrypted,
    /// No key here has the header's key id: another group, or a key this
    /// gateway has not been given yet.
    UnknownKeyId,
    /// The tag does not verify: tampered with, or sealed by another group's
    /// key whose id happens to match.
    BadTag,
}

impl CryptoError {
    /// The counter name in `gwsync status`.
    pub fn name(self) -> &'static str {
        match self {
            CryptoError::Truncated => "sealed_truncated",
            CryptoError::NotEncrypted => "unencrypted",
            CryptoError::UnknownKeyId => "unknown_key_id",
            CryptoError::BadTag => "bad_tag",
        }
    }
}

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::error::Error for CryptoError {}

struct Slot {
    id: u8,
    fingerprint: [u8; 8],
    cipher: XChaCha20Poly1305,
}

impl Slot {
    fn new(key: &GroupKey) -> Slot {
        Slot {
            id: key.id(),
            fingerprint: key.fingerprint(),
            cipher: XChaCha20Poly1305::new(&key.bytes.into()),
        }
    }
}

/// The keys of one gateway: a primary that seals everything sent, and
/// during a rotation the previous key, still accepted on receipt.
///
/// Rotation from key A to key B, one gateway at a time, never stops sync:
/// first give every gateway `{primary A, secondary B}` (all still send with
/// A, all accept B), then `{primary B, secondary A}`, then `{B}` alone.
pub struct Keyring {
    primary: Slot,
    secondary: Option<Slot>,
}

impl Keyring {
    pub fn new(primary: &GroupKey) -> Keyring {
        Keyring {
            primary: Slot::new(primary),
            secondary: None,
        }
    }

    /// A keyring that seals with `primary` and also opens `secondary`.
    pub fn with_secondary(primary: &GroupKey, secondary: &GroupKey) -> Keyring {
        Keyring {
            primary: Slot::new(primary),
            secondary: Some(Slot::new(secondary)),
        }
    }

    /// Makes `key` the primary; the old primary becomes the secondary and
    /// the old secondary is forgotten.
    pub fn rotate(&mut self, key: &GroupKey) {
        let old = std::mem::replace(&mut self.primary, Slot::new(key));
        self.secondary = Some(old);
    }

    /// Stops accepting the secondary key, once every gateway sends with the
    /// primary.
    pub fn drop_secondary(&mut self) {
        self.secondary = None;
    }

    /// The id written into every header this keyring seals.
    pub fn primary_id(&self) -> u8 {
        self.primary.id
    }

    /// (key id, fingerprint) of each key, primary first, for logs and status.
    pub fn keys(&self) -> impl Iterator<Item = (u8, [u8; 8])> + '_ {
        std::iter::once(&self.primary)
            .chain(self.secondary.as_ref())
            .map(|slot| (slot.id, slot.fingerprint))
    }

    /// Seals one datagram: `header || nonce || ciphertext || tag`, with the
    /// header authenticated. Sets the encrypted flag and the primary key's
    /// id in the header, so a caller that already wrote them changes
    /// nothing and one that did not still sends a consistent datagram.
    ///
    /// `rng` draws the nonce; see the module doc for what the daemon must
    /// pass.
    pub fn seal<R: CryptoRng + ?Sized>(
        &self,
        header: &[u8; HEADER_LEN],
        payload: &[u8],
        rng: &mut R,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + SEAL_OVERHEAD + payload.len());
        out.resize(SEALED_PAYLOAD_OFFSET, 0);
        out.extend_from_slice(payload);
        self.seal_in_place(header, &mut out, rng);
        out
    }

    /// [`Keyring::seal`] for a payload already written after
    /// [`SEALED_PAYLOAD_OFFSET`] bytes of room (the engine builds its
    /// datagrams so): the header and nonce go into the room, the payload is
    /// encrypted where it is and the tag appended, with no copy.
    pub fn seal_in_place<R: CryptoRng + ?Sized>(
        &self,
        header: &[u8; HEADER_LEN],
        datagram: &mut Vec<u8>,
        rng: &mut R,
    ) {
        let mut nonce = [0; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let mut header = *header;
        wire::mark_sealed(&mut header, self.primary.id);
        if datagram.len() < SEALED_PAYLOAD_OFFSET {
            // Shorter than the room: the payload is empty.
            datagram.resize(SEALED_PAYLOAD_OFFSET, 0);
        }
        datagram[..HEADER_LEN].copy_from_slice(&header);
        datagram[HEADER_LEN..SEALED_PAYLOAD_OFFSET].copy_from_slice(&nonce);
        let (head, body) = datagram.split_at_mut(SEALED_PAYLOAD_OFFSET);
        let tag = self
            .primary
            .cipher
            .encrypt_in_place_detached(&nonce.into(), &head[..HEADER_LEN], body)
            // The only failure is a message over 256 GiB, which no datagram is.
            .expect("a datagram payload is within the AEAD's length limit");
        datagram.extend_from_slice(&tag);
    }

    /// Authenticates and decrypts a sealed datagram whose header was
    /// checked by [`Packet::new_checked`]; returns the plaintext payload.
    /// The header is authenticated too, so use its fields only after this
    /// succeeds.
    pub fn open(&self, packet: &Packet<'_>) -> Result<Vec<u8>, CryptoError> {
        if !packet.is_encrypted() {
            return Err(CryptoError::NotEncrypted);
        }
        let header = packet.header_bytes();
        let rest = packet.body();
        if rest.len() < SEAL_OVERHEAD {
            return Err(CryptoError::Truncated);
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let nonce = XNonce::from_slice(nonce);
        let tag = Tag::from_slice(tag);
        let key_id = packet.key_id();
        // Ids are one byte, so two keys may share one (1 in 255): try every
        // key with the id rather than the first.
        let mut candidates = std::iter::once(&self.primary)
            .chain(self.secondary.as_ref())
            .filter(|slot| slot.id == key_id)
            .peekable();
        if candidates.peek().is_none() {
            return Err(CryptoError::UnknownKeyId);
        }
        for slot in candidates {
            let mut plaintext = ciphertext.to_vec();
            if slot
                .cipher
                .decrypt_in_place_detached(nonce, header, &mut plaintext, tag)
                .is_ok()
            {
                return Ok(plaintext);
            }
        }
        Err(CryptoError::BadTag)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys().map(|(id, _)| id))
            .finish()
    }
}

/// How an accepted datagram stands relative to the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// The next sequence after the highest seen.
    Next,
    /// Newer than the highest seen, with `missed` sequences between them
    /// (lost, or still on their way): the engine's loss signal.
    Skipped { missed: u32 },
    /// Older than the highest seen but within the window and not seen yet.
    Reordered,
    /// A boot id not seen before: the sender restarted.
    NewBoot,
}

/// Why a datagram is a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReplayError {
    /// This (boot, sequence) was already accepted.
    Duplicate,
    /// More than [`REPLAY_WINDOW_LEN`] below the highest sequence seen, so
    /// whether it was seen is no longer known.
    TooOld,
    /// From one of the sender's last [`RETIRED_BOOTS_MAX`] boots, which it
    /// has left.
    RetiredBoot,
    /// Older than the first datagram heard from this boot of the sender:
    /// sent before we were listening (we restarted, or joined since), so
    /// whether it was already used is unknown. A captured datagram replayed
    /// to a gateway that restarted is refused here, unless it is the first
    /// one heard from that boot (see [`ReplayWindow`]).
    BeforeFirstHeard,
}

impl ReplayError {
    /// The counter name in `gwsync status`; all are replays to the user.
    pub fn name(self) -> &'static str {
        match self {
            ReplayError::Duplicate => "replay_duplicate",
            ReplayError::TooOld => "replay_too_old",
            ReplayError::RetiredBoot => "replay_retired_boot",
            ReplayError::BeforeFirstHeard => "replay_before_first_heard",
        }
    }
}

/// The anti-replay state for one sender, over (boot id, sequence).
///
/// Feed it only datagrams that authenticated (or, with no key, decoded):
/// otherwise a forger could move the window and have real datagrams
/// refused. Sequences must not wrap within a boot: a sender about to wrap
/// takes a new boot id instead.
///
/// A replay of a boot older than the retired ones is taken as a new boot,
/// and the sender's next real datagram as another; what that lets through
/// was already merged once, and the store ignores versions it holds, so it
/// changes no data. [`ReplayWindow::boot_changes`] shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayWindow {
    boot: u32,
    highest: u32,
    /// The first sequence heard from this boot; anything below it is
    /// refused, not taken as reordered.
    first: u32,
    /// Bit `i` set: sequence `highest - i` was accepted.
    seen: u64,
    retired: [u32; RETIRED_BOOTS_MAX],
    retired_len: u8,
    /// Next slot of `retired` to overwrite, oldest first.
    retired_next: u8,
    boot_changes: u32,
}

impl ReplayWindow {
    /// The window after the first datagram heard from a sender.
    pub fn new(boot: u32, seq: u32) -> ReplayWindow {
        ReplayWindow {
            boot,
            highest: seq,
            first: seq,
            seen: 1,
            retired: [0; RETIRED_BOOTS_MAX],
            retired_len: 0,
            retired_next: 0,
            boot_changes: 0,
        }
    }

    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// The highest sequence accepted in the current boot.
    pub fn highest(&self) -> u32 {
        self.highest
    }

    /// Whether the highest sequence accepted is the boot's first one heard.
    pub fn highest_is_first(&self) -> bool {
        self.highest == self.first
    }

    /// How often the sender's boot id changed since the window was made
    /// (saturating): restarts, or replays of an old boot.
    pub fn boot_changes(&self) -> u32 {
        self.boot_changes
    }

    /// Accepts and records a (boot, sequence) seen for the first time, or
    /// says why it is a replay. A refused datagram changes nothing.
    pub fn check(&mut self, boot: u32, seq: u32) -> Result<Accepted, ReplayError> {
        if boot != self.boot {
            let retired = &self.retired[..self.retired_len as usize];
            if retired.contains(&boot) {
                return Err(ReplayError::RetiredBoot);
            }
            self.retire(self.boot);
            self.boot = boot;
            self.highest = seq;
            self.first = seq;
            self.seen = 1;
            self.boot_changes = self.boot_changes.saturating_add(1);
            return Ok(Accepted::NewBoot);
        }
        if seq > self.highest {
            let shift = seq - self.highest;
            self.seen = if shift >= REPLAY_WINDOW_LEN {
                1
            } else {
                self.seen << shift | 1
            };
            self.highest = seq;
            return Ok(match shift - 1 {
                0 => Accepted::Next,
                missed => Accepted::Skipped { missed },
            });
        }
        if seq < self.first {
            return Err(ReplayError::BeforeFirstHeard);
        }
        let age = self.highest - seq;
        if age >= REPLAY_WINDOW_LEN {
            return Err(ReplayError::TooOld);
        }
        let bit = 1u64 << age;
        if self.seen & bit != 0 {
            return Err(ReplayError::Duplicate);
        }
        self.seen |= bit;
        Ok(Accepted::Reordered)
    }

    /// Takes `boot` as the sender's current boot even if it was retired.
    /// For an open group, where headers are not authenticated: there
    /// anyone can announce a boot under any id, and refusing the real boot
    /// once a forged one retired it would silence the real sender.
    pub fn switch_boot(&mut self, boot: u32, seq: u32) -> Accepted {
        let retired_len = self.retired_len as usize;
        if let Some(at) = self.retired[..retired_len].iter().position(|&b| b == boot) {
            self.retired[at] = self.boot;
        } else {
            self.retire(self.boot);
        }
        self.boot = boot;
        self.highest = seq;
        self.first = seq;
        self.seen = 1;
        self.boot_changes = self.boot_changes.saturating_add(1);
        Accepted::NewBoot
    }

    fn retire(&mut self, boot: u32) {
        self.retired[self.retired_next as usize] = boot;
        self.retired_next = (self.retired_next + 1) % RETIRED_BOOTS_MAX as u8;
        self.retired_len = (self.retired_len + 1).min(RETIRED_BOOTS_MAX as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::NodeId;
    use crate::wire::{FLAG_ENCRYPTED, Header, MessageType};
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{RngCore, SeedableRng};

    fn key(fill: u8) -> GroupKey {
        GroupKey::from_bytes([fill; KEY_LEN])
    }

    fn header_bytes(key_id: u8) -> [u8; HEADER_LEN] {
        let header = Header {
            message_type: MessageType::Summary,
            flags: FLAG_ENCRYPTED,
            key_id,
            sender: NodeId(0x0102_0304_0506_0708),
            boot: 0x0a0b_0c0d,
            seq: 7,
        };
        let mut out = Vec::new();
        header.emit(&mut out);
        out.try_into().unwrap()
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(1)
    }

    // Where the wire layout puts the two header fields sealing sets.
    const FLAGS_OFFSET: usize = 4;
    const KEY_ID_OFFSET: usize = 5;

    /// Opens raw bytes as the engine does: the wire checks the header first
    /// (`Err(None)` when it refuses it), then the keyring.
    fn open(keyring: &Keyring, bytes: &[u8]) -> Result<Vec<u8>, Option<CryptoError>> {
        let packet = Packet::new_checked(bytes).map_err(|_| None)?;
        keyring.open(&packet).map_err(Some)
    }

    #[test]
    fn sealing_fields_are_where_the_wire_reads_them() {
        let mut bytes = header_bytes(0);
        bytes[FLAGS_OFFSET] = 0;
        wire::mark_sealed(&mut bytes, 0xab);
        let packet = Packet::new_checked(&bytes).unwrap();
        assert!(packet.is_encrypted());
        assert_eq!(packet.key_id(), 0xab);
    }

    #[test]
    fn a_sealed_datagram_opens_to_its_payload() {
        let keyring = Keyring::new(&key(1));
        let payload = b"scene/1 on".to_vec();
        let sealed = keyring.seal(&header_bytes(keyring.primary_id()), &payload, &mut rng());
        assert_eq!(open(&keyring, &sealed), Ok(payload));
    }

    #[test]
    fn an_empty_payload_round_trips() {
        let keyring = Keyring::new(&key(1));
        let sealed = keyring.seal(&header_bytes(keyring.primary_id()), &[], &mut rng());
        assert_eq!(sealed.len(), HEADER_LEN + SEAL_OVERHEAD);
        assert_eq!(open(&keyring, &sealed), Ok(Vec::new()));
    }

    #[test]
    fn layout_is_header_nonce_ciphertext_tag() {
        let group_key = key(7);
        let keyring = Keyring::new(&group_key);
        let header = header_bytes(keyring.primary_id());
        let payload = [0x55u8; 100];
        let sealed = keyring.seal(&header, &payload, &mut rng());

        let mut nonce = [0; NONCE_LEN];
        rng().fill_bytes(&mut nonce);
        let mut independent = payload.to_vec();
        let tag = XChaCha20Poly1305::new(&group_key.bytes.into())
            .encrypt_in_place_detached(&nonce.into(), &header, &mut independent)
            .unwrap();
        independent.extend_from_slice(&tag);
        assert_eq!(sealed.len(), HEADER_LEN + payload.len() + SEAL_OVERHEAD);
        assert_eq!(SEAL_OVERHEAD, 40);
        assert_eq!(sealed[..HEADER_LEN], header);
        assert_eq!(sealed[HEADER_LEN..HEADER_LEN + NONCE_LEN], nonce);
        assert_eq!(sealed[HEADER_LEN + NONCE_LEN..], independent[..]);
    }

    #[test]
    fn seal_sets_the_flag_and_key_id_the_caller_left_out() {
        let keyring = Keyring::new(&key(1));
        let mut header = header_bytes(0);
        header[FLAGS_OFFSET] = 0;
        let sealed = keyring.seal(&header, b"x", &mut rng());
        assert_eq!(sealed[FLAGS_OFFSET], FLAG_ENCRYPTED);
        assert_eq!(sealed[KEY_ID_OFFSET], keyring.primary_id());
        let parsed = Header::parse(&sealed).unwrap();
        assert_eq!(parsed.key_id, keyring.primary_id());
        assert_eq!(open(&keyring, &sealed), Ok(b"x".to_vec()));
    }

    #[test]
    fn nonces_differ_between_seals() {
        let keyring = Keyring::new(&key(1));
        let header = header_bytes(keyring.primary_id());
        let mut rng = rng();
        let a = keyring.seal(&header, b"same", &mut rng);
        let b = keyring.seal(&header, b"same", &mut rng);
        assert_ne!(a, b);
    }

    #[test]
    fn every_tampered_header_byte_fails_the_tag() {
        let keyring = Keyring::new(&key(1));
        let sealed = keyring.seal(&header_bytes(keyring.primary_id()), b"payload", &mut rng());
        for index in 0..HEADER_LEN {
            if index == FLAGS_OFFSET || index == KEY_ID_OFFSET {
                continue;
            }
            let mut tampered = sealed.clone();
            tampered[index] ^= 0x01;
            // Magic, version, type and reserved bytes are refused by the
            // wire before the key is tried; every other byte fails the tag.
            let expected = if index < 4 || (6..8).contains(&index) {
                Err(None)
            } else {
                Err(Some(CryptoError::BadTag))
            };
            assert_eq!(open(&keyring, &tampered), expected, "header byte {index}");
        }
        let mut flags = sealed.clone();
        flags[FLAGS_OFFSET] ^= 0x80;
        assert_eq!(open(&keyring, &flags), Err(Some(CryptoError::BadTag)));
    }

    #[test]
    fn tampered_nonce_ciphertext_or_tag_fails_the_tag() {
        let keyring = Keyring::new(&key(1));
        let sealed = keyring.seal(&header_bytes(keyring.primary_id()), b"payload", &mut rng());
        for index in HEADER_LEN..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[index] ^= 0x40;
            assert_eq!(
                open(&keyring, &tampered),
                Err(Some(CryptoError::BadTag)),
                "byte {index}"
            );
        }
    }

    #[test]
    fn another_key_with_the_same_id_fails_the_tag() {
        let ours = Keyring::new(&key(1));
        let (theirs, _) = (2..=255u8)
            .map(|fill| (key(fill), fill))
            .find(|(other, _)| other.id() == ours.primary_id())
            .expect("some key among 254 shares the id");
        let sealed = Keyring::new(&theirs).seal(&header_bytes(0), b"payload", &mut rng());
        assert_eq!(open(&ours, &sealed), Err(Some(CryptoError::BadTag)));
    }

    #[test]
    fn a_key_id_we_do_not_hold_is_named() {
        let ours = Keyring::new(&key(1));
        let theirs = (2..=255u8)
            .map(key)
            .find(|other| other.id() != ours.primary_id())
            .unwrap();
        let sealed = Keyring::new(&theirs).seal(&header_bytes(0), b"payload", &mut rng());
        assert_eq!(open(&ours, &sealed), Err(Some(CryptoError::UnknownKeyId)));
    }

    #[test]
    fn truncated_and_unencrypted_datagrams_are_named() {
        let keyring = Keyring::new(&key(1));
        let sealed = keyring.seal(&header_bytes(keyring.primary_id()), b"payload", &mut rng());
        for len in 0..HEADER_LEN {
            assert_eq!(open(&keyring, &sealed[..len]), Err(None), "{len} bytes");
        }
        for len in HEADER_LEN..HEADER_LEN + SEAL_OVERHEAD {
            assert_eq!(
                open(&keyring, &sealed[..len]),
                Err(Some(CryptoError::Truncated)),
                "{len} bytes"
            );
        }
        // Cut inside the ciphertext: long enough to parse, so the tag fails.
        assert_eq!(
            open(&keyring, &sealed[..sealed.len() - 1]),
            Err(Some(CryptoError::BadTag))
        );
        let mut plain = sealed.clone();
        plain[FLAGS_OFFSET] = 0;
        assert_eq!(open(&keyring, &plain), Err(Some(CryptoError::NotEncrypted)));
    }

    #[test]
    fn rotation_opens_both_keys_and_seals_with_the_primary() {
        let (a, b) = (key(0xa), key(0xb));
        let old = Keyring::new(&a);
        let new = Keyring::new(&b);
        let mut both = Keyring::with_secondary(&b, &a);
        let header = header_bytes(0);
        let from_old = old.seal(&header, b"old", &mut rng());
        let from_new = new.seal(&header, b"new", &mut rng());
        assert_eq!(open(&both, &from_old), Ok(b"old".to_vec()));
        assert_eq!(open(&both, &from_new), Ok(b"new".to_vec()));

        let from_both = both.seal(&header, b"both", &mut rng());
        assert_eq!(from_both[KEY_ID_OFFSET], b.id());
        assert_eq!(open(&new, &from_both), Ok(b"both".to_vec()));
        assert!(open(&old, &from_both).is_err());

        both.drop_secondary();
        assert!(open(&both, &from_old).is_err());
        both.rotate(&a);
        assert_eq!(both.primary_id(), a.id());
        assert_eq!(open(&both, &from_new), Ok(b"new".to_vec()));
        assert_eq!(both.keys().count(), 2);
    }

    #[test]
    fn two_keys_sharing_an_id_both_open() {
        let a = key(1);
        let b = (2..=255u8)
            .map(key)
            .find(|other| other.id() == a.id())
            .unwrap();
        let both = Keyring::with_secondary(&a, &b);
        let sealed = Keyring::new(&b).seal(&header_bytes(0), b"b", &mut rng());
        assert_eq!(open(&both, &sealed), Ok(b"b".to_vec()));
    }

    /// Pins the key-id derivation: gateways on different builds must agree.
    #[test]
    fn key_id_and_fingerprint_are_stable() {
        let key: GroupKey = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
            .parse()
            .unwrap();
        assert_eq!(
            (key.id(), key.fingerprint()),
            (GOLDEN_ID, GOLDEN_FINGERPRINT),
            "{key:?}"
        );
    }
    const GOLDEN_ID: u8 = 142;
    const GOLDEN_FINGERPRINT: [u8; 8] = [0x87, 0x69, 0x74, 0x90, 0x14, 0x04, 0xae, 0x2f];

    #[test]
    fn key_ids_are_never_zero() {
        let mut rng = rng();
        for _ in 0..2_000 {
            assert_ne!(GroupKey::from_rng(&mut rng).id(), NO_KEY_ID);
        }
    }

    #[test]
    fn keys_parse_from_hex_and_base64() {
        let bytes: [u8; KEY_LEN] = std::array::from_fn(|i| (i * 8 + 3) as u8);
        let expected = GroupKey::from_bytes(bytes);
        let hex = expected.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(
            format!("  {hex}\n").parse::<GroupKey>(),
            Ok(expected.clone())
        );
        assert_eq!(hex.to_uppercase().parse::<GroupKey>(), Ok(expected.clone()));
        // `base64` of the same bytes, from coreutils.
        let base64 = "AwsTGyMrMztDS1NbY2tze4OLk5ujq7O7w8vT2+Pr8/s=";
        assert_eq!(base64.parse::<GroupKey>(), Ok(expected.clone()));
        assert_eq!(
            base64.trim_end_matches('=').parse::<GroupKey>(),
            Ok(expected.clone())
        );
        let url_safe = base64.replace('+', "-").replace('/', "_");
        assert_eq!(url_safe.parse::<GroupKey>(), Ok(expected));
    }

    #[test]
    fn bad_key_text_is_named() {
        assert_eq!("".parse::<GroupKey>(), Err(KeyParseError::WrongLength));
        assert_eq!("abcd".parse::<GroupKey>(), Err(KeyParseError::WrongLength));
        assert_eq!(
            "g".repeat(64).parse::<GroupKey>(),
            Err(KeyParseError::BadCharacter)
        );
        assert_eq!(
            "0".repeat(64).parse::<GroupKey>(),
            Err(KeyParseError::AllZero)
        );
        assert_eq!(
            "A".repeat(43).parse::<GroupKey>(),
            Err(KeyParseError::AllZero)
        );
        // The last character's two unused bits are not zero.
        assert_eq!(
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB".parse::<GroupKey>(),
            Err(KeyParseError::BadCharacter)
        );
        assert_eq!(
            format!("{}!", "A".repeat(43)).parse::<GroupKey>(),
            Err(KeyParseError::WrongLength)
        );
        assert_eq!(
            "é".repeat(32).parse::<GroupKey>(),
            Err(KeyParseError::BadCharacter)
        );
    }

    #[test]
    fn generated_keys_differ_and_round_trip_through_hex() {
        let a = GroupKey::generate().unwrap();
        let b = GroupKey::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_hex().parse::<GroupKey>(), Ok(a));
    }

    #[test]
    fn debug_output_does_not_show_the_key() {
        let key = key(0xab);
        let shown = format!("{key:?} {:?}", Keyring::new(&key));
        assert!(!shown.contains("abab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
    }

    #[cfg(unix)]
    #[test]
    fn key_files_load_and_warn_when_others_may_read_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("gwsync-crypto-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        let key = key(0x42);
        std::fs::write(&path, format!("{}\n", key.to_hex())).unwrap();

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (loaded, warning) = load_key_file(&path).unwrap();
        assert_eq!((loaded, warning), (vec![key.clone()], None));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (_, warning) = load_key_file(&path).unwrap();
        assert_eq!(
            warning,
            Some(KeyFileWarning::ReadableByOthers { mode: 0o644 })
        );

        let next = self::key(0x43);
        std::fs::write(
            &path,
            format!(
                "# current, then next\n{}\n\n{}\n",
                key.to_hex(),
                next.to_hex()
            ),
        )
        .unwrap();
        let (loaded, _) = load_key_file(&path).unwrap();
        assert_eq!(loaded, vec![key.clone(), next.clone()]);
        std::fs::write(
            &path,
            format!("{}\n{}\n{}\n", key.to_hex(), next.to_hex(), key.to_hex()),
        )
        .unwrap();
        assert!(matches!(
            load_key_file(&path),
            Err(KeyFileError::KeyCount(3))
        ));
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(matches!(
            load_key_file(&path),
            Err(KeyFileError::KeyCount(0))
        ));
        std::fs::write(&path, format!("{}\nnot a key", key.to_hex())).unwrap();
        assert!(matches!(
            load_key_file(&path),
            Err(KeyFileError::Parse {
                line: 2,
                error: KeyParseError::WrongLength
            })
        ));
        std::fs::write(&path, vec![b' '; KEY_FILE_BYTES_MAX as usize + 1]).unwrap();
        assert!(matches!(load_key_file(&path), Err(KeyFileError::TooLarge)));
        assert!(matches!(
            load_key_file(&dir.join("missing")),
            Err(KeyFileError::Io(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replay_window_accepts_in_order_and_names_gaps() {
        let mut window = ReplayWindow::new(9, 1);
        assert_eq!(window.check(9, 2), Ok(Accepted::Next));
        assert_eq!(window.check(9, 3), Ok(Accepted::Next));
        assert_eq!(window.check(9, 6), Ok(Accepted::Skipped { missed: 2 }));
        assert_eq!(window.highest(), 6);
    }

    #[test]
    fn replay_window_accepts_reordered_within_the_window_once() {
        let mut window = ReplayWindow::new(9, 1);
        assert_eq!(window.check(9, 70), Ok(Accepted::Skipped { missed: 68 }));
        assert_eq!(window.check(9, 20), Ok(Accepted::Reordered));
        assert_eq!(window.check(9, 20), Err(ReplayError::Duplicate));
        assert_eq!(window.check(9, 70), Err(ReplayError::Duplicate));
        assert_eq!(
            window.check(9, 70 - REPLAY_WINDOW_LEN + 1),
            Ok(Accepted::Reordered)
        );
        assert_eq!(
            window.check(9, 70 - REPLAY_WINDOW_LEN),
            Err(ReplayError::TooOld)
        );
        assert_eq!(window.check(9, 1), Err(ReplayError::TooOld));
    }

    #[test]
    fn sequences_before_the_first_heard_are_refused_after_a_restart_or_join() {
        let mut window = ReplayWindow::new(9, 40);
        assert_eq!(window.check(9, 39), Err(ReplayError::BeforeFirstHeard));
        assert_eq!(window.check(9, 1), Err(ReplayError::BeforeFirstHeard));
        assert_eq!(window.check(9, 42), Ok(Accepted::Skipped { missed: 1 }));
        assert_eq!(window.check(9, 41), Ok(Accepted::Reordered));
        assert_eq!(window.check(10, 7), Ok(Accepted::NewBoot));
        assert_eq!(window.check(10, 6), Err(ReplayError::BeforeFirstHeard));
    }

    #[test]
    fn replay_window_rejects_duplicates() {
        let mut window = ReplayWindow::new(9, 5);
        assert_eq!(window.check(9, 5), Err(ReplayError::Duplicate));
        assert_eq!(window.check(9, 6), Ok(Accepted::Next));
        assert_eq!(window.check(9, 6), Err(ReplayError::Duplicate));
        assert_eq!(window.check(9, 5), Err(ReplayError::Duplicate));
    }

    #[test]
    fn a_jump_past_the_window_forgets_everything_below() {
        let mut window = ReplayWindow::new(9, 1);
        assert_eq!(
            window.check(9, 1_000),
            Ok(Accepted::Skipped { missed: 998 })
        );
        assert_eq!(window.check(9, 999), Ok(Accepted::Reordered));
        assert_eq!(window.check(9, 2), Err(ReplayError::TooOld));
        assert_eq!(
            window.check(9, u32::MAX),
            Ok(Accepted::Skipped {
                missed: u32::MAX - 1_001
            })
        );
        assert_eq!(window.check(9, u32::MAX), Err(ReplayError::Duplicate));
    }

    #[test]
    fn a_restart_is_a_new_boot_and_the_old_boot_stays_closed() {
        let mut window = ReplayWindow::new(9, 50);
        assert_eq!(window.check(10, 1), Ok(Accepted::NewBoot));
        assert_eq!(window.check(10, 2), Ok(Accepted::Next));
        assert_eq!(window.check(9, 51), Err(ReplayError::RetiredBoot));
        assert_eq!(window.check(10, 1), Err(ReplayError::Duplicate));
        assert_eq!(window.boot(), 10);
        assert_eq!(window.boot_changes(), 1);
    }

    #[test]
    fn an_open_group_can_switch_back_to_a_retired_boot() {
        let mut window = ReplayWindow::new(9, 50);
        assert_eq!(window.check(66, 1), Ok(Accepted::NewBoot));
        assert_eq!(window.check(9, 51), Err(ReplayError::RetiredBoot));
        assert_eq!(window.switch_boot(9, 51), Accepted::NewBoot);
        assert_eq!(window.check(9, 52), Ok(Accepted::Next));
        assert_eq!(window.check(66, 2), Err(ReplayError::RetiredBoot));
    }

    #[test]
    fn only_the_last_few_boots_are_remembered() {
        let mut window = ReplayWindow::new(0, 1);
        for boot in 1..=RETIRED_BOOTS_MAX as u32 + 1 {
            assert_eq!(window.check(boot, 1), Ok(Accepted::NewBoot));
        }
        // Boot 0 has been pushed out of the retired list; boots 1.. are in it.
        assert_eq!(window.check(1, 2), Err(ReplayError::RetiredBoot));
        assert_eq!(window.check(0, 2), Ok(Accepted::NewBoot));
        assert_eq!(window.boot_changes(), RETIRED_BOOTS_MAX as u32 + 2);
    }

    proptest! {
        #[test]
        fn open_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let keyring = Keyring::with_secondary(&key(1), &key(2));
            prop_assert!(open(&keyring, &bytes).is_err());
        }

        #[test]
        fn open_never_panics_on_mangled_seals(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            flips in proptest::collection::vec((any::<usize>(), 1u8..), 1..4),
            cut in any::<usize>(),
        ) {
            let keyring = Keyring::new(&key(1));
            let mut sealed = keyring.seal(&header_bytes(0), &payload, &mut rng());
            for (index, mask) in flips {
                let len = sealed.len();
                sealed[index % len] ^= mask;
            }
            sealed.truncate(cut % (sealed.len() + 1));
            prop_assert!(open(&keyring, &sealed).is_err());
        }

        #[test]
        fn seal_then_open_is_identity(payload in proptest::collection::vec(any::<u8>(), 0..1500), seed: u64) {
            let keyring = Keyring::new(&key(3));
            let sealed = keyring.seal(&header_bytes(0), &payload, &mut StdRng::seed_from_u64(seed));
            prop_assert_eq!(open(&keyring, &sealed), Ok(payload));
        }

        /// Against a model that remembers every (boot, seq) ever accepted:
        /// the window never accepts one twice.
        #[test]
        fn the_window_never_accepts_a_pair_twice(
            inputs in proptest::collection::vec((0u32..3, 0u32..200), 1..400),
        ) {
            let mut window = ReplayWindow::new(0, 0);
            let mut accepted = std::collections::BTreeSet::from([(0, 0)]);
            for (boot, seq) in inputs {
                if window.check(boot, seq).is_ok() {
                    prop_assert!(accepted.insert((boot, seq)), "({}, {}) accepted twice", boot, seq);
                }
            }
        }
    }
}
