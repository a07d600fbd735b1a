//! Datagram encoding and decoding.
//!
//! Every datagram is independently useful: it carries whole entries (or one
//! fragment of a large value with enough context to reassemble it), so a lost
//! datagram costs only what it carried. Multicast over Wi-Fi has no
//! retransmission and IP fragments multiply loss, so datagrams stay below a
//! configured size (about 1400 bytes by default).
//!
//! All integers are big-endian. Layout (offsets in bytes):
//!
//! ```text
//! header (24 bytes, authenticated as associated data when a key is set)
//!  0  magic        u16  0x4757 ("GW")
//!  2  version      u8   PROTOCOL_VERSION
//!  3  type         u8   MessageType
//!  4  flags        u8   bit 0: payload encrypted; bit 1: the sender saw
//!                       loss lately (peers then follow pushes with tails);
//!                       bit 2: this push is repeated or followed by a
//!                       summary
//!  5  key id       u8   which group key sealed the payload (0: none)
//!  6  reserved     u16  zero
//!  8  sender       u64  node id
//! 16  boot         u32  random per process start: tells a restart (and a
//!                       cloned node id) from the same process
//! 20  sequence     u32  per boot, +1 per datagram
//! 24  payload
//! ```
//!
//! Payloads:
//!
//! ```text
//! Summary        digest u64, entries u32, clock u64
//! Entries        kind u8 (bit 0: a repair, bit 1: the sender's digest
//!                follows) [bucket u16, bucket digest u64] [digest u64]
//!                count u16, count x entry
//!   entry        key_len u16, key, hlc u64, origin u64, kind u8 (0 tombstone,
//!                1 value) [value_len u32, value]
//! Fragment       key_len u16, key, hlc u64, origin u64, total_len u32,
//!                offset u32, chunk_len u16, chunk
//! BucketDigests  digest u64, first u16, end u16, count u16,
//!                count x (bucket u16, digest u64, entries u16, max hlc u64)
//!                buckets in first..end that are not listed are empty
//! ```
//!
//! Decoding never panics and never allocates more than the datagram holds:
//! every length is checked against the bytes that remain before it is used.

use crate::proto::{BucketSummary, Hlc, NodeId, Version};

pub const MAGIC: u16 = 0x4757;
pub const PROTOCOL_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 24;
/// Bytes an entry adds besides its key and value.
pub const ENTRY_OVERHEAD: usize = 2 + 8 + 8 + 1 + 4;
/// Bytes a fragment adds besides its key and chunk.
pub const FRAGMENT_OVERHEAD: usize = 2 + 8 + 8 + 4 + 4 + 2;
/// Bytes of an Entries payload before its entries.
pub const ENTRIES_PREFIX_MAX: usize = 1 + 2 + 8 + 8 + 2;
const ENTRIES_REPAIR: u8 = 1;
const ENTRIES_DIGEST: u8 = 2;
/// Bytes of one bucket in a BucketDigests payload.
pub const BUCKET_DIGEST_LEN: usize = 2 + 8 + 2 + 8;
pub const BUCKET_DIGESTS_PREFIX: usize = 8 + 2 + 2 + 2;

pub const FLAG_ENCRYPTED: u8 = 1;
pub const FLAG_LOSS_SEEN: u8 = 2;
/// On a push: its sender repeats it or follows it with a summary (it has
/// seen or heard of loss lately), so a receiver that notices a gap before
/// it need not probe.
pub const FLAG_TAIL_FOLLOWS: u8 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum MessageType {
    Summary = 1,
    Entries = 2,
    Fragment = 3,
    BucketDigests = 4,
}

impl MessageType {
    fn from_u8(value: u8) -> Option<MessageType> {
        Some(match value {
            1 => MessageType::Summary,
            2 => MessageType::Entries,
            3 => MessageType::Fragment,
            4 => MessageType::BucketDigests,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub message_type: MessageType,
    pub flags: u8,
    pub key_id: u8,
    pub sender: NodeId,
    pub boot: u32,
    pub seq: u32,
}

/// The method's sync request: "this is the data I hold".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub digest: u64,
    pub entries: u32,
    /// The sender's clock high-water mark, so clocks stay close together and
    /// tombstones expire at about the same time everywhere.
    pub clock: Hlc,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireEntry {
    pub key: String,
    pub version: Version,
    pub value: Option<Vec<u8>>,
}

impl WireEntry {
    pub fn encoded_len(key: &str, value: Option<&[u8]>) -> usize {
        ENTRY_OVERHEAD + key.len() + value.map_or(0, |value| value.len())
    }
}

/// Marks an Entries datagram as (part of) the full contents of one bucket,
/// so other responders can tell an answer identical to theirs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepairTag {
    pub bucket: u16,
    pub digest: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entries {
    pub repair: Option<RepairTag>,
    /// The sender's data digest (as in its summary) as of this datagram, on
    /// the last datagram of a push: a receiver that still differs after
    /// merging the push lacks something else (a gateway that lost every
    /// copy of an earlier update learns it at the next push from anyone,
    /// not at the next Trickle summary), and one that matches needs no
    /// probe for a gap.
    pub digest: Option<u64>,
    pub entries: Vec<WireEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fragment {
    pub key: String,
    pub version: Version,
    pub total_len: u32,
    pub offset: u32,
    pub chunk: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketDigests {
    /// The sender's summary digest.
    pub digest: u64,
    pub first: u16,
    pub end: u16,
    pub buckets: Vec<(u16, BucketSummary)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Summary(Summary),
    Entries(Entries),
    Fragment(Fragment),
    BucketDigests(BucketDigests),
}

impl Message {
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Summary(_) => MessageType::Summary,
            Message::Entries(_) => MessageType::Entries,
            Message::Fragment(_) => MessageType::Fragment,
            Message::BucketDigests(_) => MessageType::BucketDigests,
        }
    }
}

/// Why a datagram could not be decoded. Network input never becomes an
/// error for the caller: the engine drops it and counts it under this reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DecodeError {
    /// Shorter than its header or than a length field says.
    Truncated,
    /// Not a gwsync datagram.
    BadMagic,
    /// A protocol version this build does not speak.
    UnknownVersion,
    /// A message type this build does not know.
    UnknownType,
    /// A field holds an impossible value (bad UTF-8, bad kind, bucket range).
    Malformed,
    /// Bytes left over after the payload.
    TrailingBytes,
    /// Encrypted, and no key here opens it (or it was tampered with).
    BadKey,
    /// Not encrypted, but this gateway requires a group key.
    Unencrypted,
    /// The header's reserved field is not zero: a future extension this
    /// build cannot honour.
    ReservedSet,
}

impl DecodeError {
    pub fn name(self) -> &'static str {
        match self {
            DecodeError::Truncated => "truncated",
            DecodeError::BadMagic => "bad_magic",
            DecodeError::UnknownVersion => "unknown_version",
            DecodeError::UnknownType => "unknown_type",
            DecodeError::Malformed => "malformed",
            DecodeError::TrailingBytes => "trailing_bytes",
            DecodeError::BadKey => "bad_key",
            DecodeError::Unencrypted => "unencrypted",
            DecodeError::ReservedSet => "reserved_set",
        }
    }
}

/// A bounds-checked reader: every accessor fails instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if len > self.bytes.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn key(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Malformed)
    }

    fn version(&mut self) -> Result<Version, DecodeError> {
        Ok(Version {
            hlc: Hlc(self.u64()?),
            origin: NodeId(self.u64()?),
        })
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

/// Byte ranges of the header fields; the one place the layout is written
/// down in code. Private, so every other module reads the header through
/// [`Packet`].
mod field {
    use std::ops::Range;

    pub const MAGIC: Range<usize> = 0..2;
    pub const VERSION: usize = 2;
    pub const TYPE: usize = 3;
    pub const FLAGS: usize = 4;
    pub const KEY_ID: usize = 5;
    pub const RESERVED: Range<usize> = 6..8;
    pub const SENDER: Range<usize> = 8..16;
    pub const BOOT: Range<usize> = 16..20;
    pub const SEQ: Range<usize> = 20..24;
    pub const PAYLOAD: usize = 24;
}

/// A read view over a datagram: its header fields and the bytes after them.
///
/// Built with [`Packet::new_checked`], no accessor can panic: the length,
/// magic, version, type and reserved field were checked once, so the
/// header is parsed once per datagram whether or not it is sealed.
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    bytes: &'a [u8],
    message_type: MessageType,
}

impl<'a> Packet<'a> {
    /// Checks everything the header alone can tell.
    pub fn new_checked(bytes: &'a [u8]) -> Result<Packet<'a>, DecodeError> {
        if bytes.len() < field::MAGIC.end || u16_at(bytes, field::MAGIC) != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::Truncated);
        }
        if bytes[field::VERSION] != PROTOCOL_VERSION {
            return Err(DecodeError::UnknownVersion);
        }
        let message_type =
            MessageType::from_u8(bytes[field::TYPE]).ok_or(DecodeError::UnknownType)?;
        if u16_at(bytes, field::RESERVED) != 0 {
            return Err(DecodeError::ReservedSet);
        }
        Ok(Packet {
            bytes,
            message_type,
        })
    }

    pub fn message_type(&self) -> MessageType {
        self.message_type
    }

    pub fn flags(&self) -> u8 {
        self.bytes[field::FLAGS]
    }

    pub fn is_encrypted(&self) -> bool {
        self.flags() & FLAG_ENCRYPTED != 0
    }

    pub fn key_id(&self) -> u8 {
        self.bytes[field::KEY_ID]
    }

    pub fn sender(&self) -> NodeId {
        NodeId(u64::from_be_bytes(array_at(self.bytes, field::SENDER)))
    }

    pub fn boot(&self) -> u32 {
        u32::from_be_bytes(array_at(self.bytes, field::BOOT))
    }

    pub fn seq(&self) -> u32 {
        u32::from_be_bytes(array_at(self.bytes, field::SEQ))
    }

    /// The header bytes: associated data when the datagram is sealed.
    pub fn header_bytes(&self) -> &'a [u8] {
        &self.bytes[..field::PAYLOAD]
    }

    /// Everything after the header: the payload, or when sealed the nonce,
    /// ciphertext and tag.
    pub fn body(&self) -> &'a [u8] {
        &self.bytes[field::PAYLOAD..]
    }

    pub fn header(&self) -> Header {
        Header {
            message_type: self.message_type,
            flags: self.flags(),
            key_id: self.key_id(),
            sender: self.sender(),
            boot: self.boot(),
            seq: self.seq(),
        }
    }
}

fn array_at<const N: usize>(bytes: &[u8], range: std::ops::Range<usize>) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[range]);
    out
}

fn u16_at(bytes: &[u8], range: std::ops::Range<usize>) -> u16 {
    u16::from_be_bytes(array_at(bytes, range))
}

/// Sets the sealing fields of a header in place: the encrypted flag and the
/// key id.
pub fn mark_sealed(header: &mut [u8; HEADER_LEN], key_id: u8) {
    header[field::FLAGS] |= FLAG_ENCRYPTED;
    header[field::KEY_ID] = key_id;
}

impl Header {
    pub fn parse(bytes: &[u8]) -> Result<Header, DecodeError> {
        Packet::new_checked(bytes).map(|packet| packet.header())
    }

    /// The 24 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        out[field::MAGIC].copy_from_slice(&MAGIC.to_be_bytes());
        out[field::VERSION] = PROTOCOL_VERSION;
        out[field::TYPE] = self.message_type as u8;
        out[field::FLAGS] = self.flags;
        out[field::KEY_ID] = self.key_id;
        out[field::SENDER].copy_from_slice(&self.sender.0.to_be_bytes());
        out[field::BOOT].copy_from_slice(&self.boot.to_be_bytes());
        out[field::SEQ].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }
}

fn emit_key(key: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(key.len() as u16).to_be_bytes());
    out.extend_from_slice(key.as_bytes());
}

fn emit_version(version: Version, out: &mut Vec<u8>) {
    out.extend_from_slice(&version.hlc.0.to_be_bytes());
    out.extend_from_slice(&version.origin.0.to_be_bytes());
}

/// What an Entries payload holds before its `count` entries (each then
/// written by [`emit_entry`]): a sender can write entries it only borrows
/// and put this in front, without an owned [`WireEntry`] for each.
pub fn emit_entries_prefix(
    repair: Option<RepairTag>,
    digest: Option<u64>,
    count: u16,
    out: &mut Vec<u8>,
) {
    let mut kind = 0;
    if repair.is_some() {
        kind |= ENTRIES_REPAIR;
    }
    if digest.is_some() {
        kind |= ENTRIES_DIGEST;
    }
    out.push(kind);
    if let Some(tag) = repair {
        out.extend_from_slice(&tag.bucket.to_be_bytes());
        out.extend_from_slice(&tag.digest.to_be_bytes());
    }
    if let Some(digest) = digest {
        out.extend_from_slice(&digest.to_be_bytes());
    }
    out.extend_from_slice(&count.to_be_bytes());
}

/// Appends one entry in the Entries layout; callers size datagrams with
/// [`WireEntry::encoded_len`].
pub fn emit_entry(key: &str, version: Version, value: Option<&[u8]>, out: &mut Vec<u8>) {
    emit_key(key, out);
    emit_version(version, out);
    match value {
        None => out.push(0),
        Some(value) => {
            out.push(1);
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
    }
}

impl Message {
    /// Appends the payload (not the header).
    pub fn emit_payload(&self, out: &mut Vec<u8>) {
        match self {
            Message::Summary(summary) => {
                out.extend_from_slice(&summary.digest.to_be_bytes());
                out.extend_from_slice(&summary.entries.to_be_bytes());
                out.extend_from_slice(&summary.clock.0.to_be_bytes());
            }
            Message::Entries(entries) => {
                emit_entries_prefix(
                    entries.repair,
                    entries.digest,
                    entries.entries.len() as u16,
                    out,
                );
                for entry in &entries.entries {
                    emit_entry(&entry.key, entry.version, entry.value.as_deref(), out);
                }
            }
            Message::Fragment(fragment) => {
                emit_key(&fragment.key, out);
                emit_version(fragment.version, out);
                out.extend_from_slice(&fragment.total_len.to_be_bytes());
                out.extend_from_slice(&fragment.offset.to_be_bytes());
                out.extend_from_slice(&(fragment.chunk.len() as u16).to_be_bytes());
                out.extend_from_slice(&fragment.chunk);
            }
            Message::BucketDigests(digests) => {
                out.extend_from_slice(&digests.digest.to_be_bytes());
                out.extend_from_slice(&digests.first.to_be_bytes());
                out.extend_from_slice(&digests.end.to_be_bytes());
                out.extend_from_slice(&(digests.buckets.len() as u16).to_be_bytes());
                for (bucket, summary) in &digests.buckets {
                    out.extend_from_slice(&bucket.to_be_bytes());
                    out.extend_from_slice(&summary.digest.to_be_bytes());
                    out.extend_from_slice(
                        &(summary.count.min(u16::MAX as u32) as u16).to_be_bytes(),
                    );
                    out.extend_from_slice(&summary.max_hlc.0.to_be_bytes());
                }
            }
        }
    }

    /// Parses a payload of the type the header named.
    pub fn parse_payload(message_type: MessageType, bytes: &[u8]) -> Result<Message, DecodeError> {
        let mut reader = Reader { bytes };
        let message = match message_type {
            MessageType::Summary => Message::Summary(Summary {
                digest: reader.u64()?,
                entries: reader.u32()?,
                clock: Hlc(reader.u64()?),
            }),
            MessageType::Entries => {
                let kind = reader.u8()?;
                if kind & !(ENTRIES_REPAIR | ENTRIES_DIGEST) != 0 {
                    return Err(DecodeError::Malformed);
                }
                let repair = if kind & ENTRIES_REPAIR != 0 {
                    Some(RepairTag {
                        bucket: reader.u16()?,
                        digest: reader.u64()?,
                    })
                } else {
                    None
                };
                let digest = if kind & ENTRIES_DIGEST != 0 {
                    Some(reader.u64()?)
                } else {
                    None
                };
                let count = reader.u16()? as usize;
                // Each entry takes at least ENTRY_OVERHEAD - 4 bytes, so a
                // count the datagram cannot hold is refused before allocating.
                if count > reader.bytes.len() / (ENTRY_OVERHEAD - 4) {
                    return Err(DecodeError::Truncated);
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let key = reader.key()?;
                    let version = reader.version()?;
                    let value = match reader.u8()? {
                        0 => None,
                        1 => {
                            let len = reader.u32()? as usize;
                            Some(reader.take(len)?.to_vec())
                        }
                        _ => return Err(DecodeError::Malformed),
                    };
                    entries.push(WireEntry {
                        key,
                        version,
                        value,
                    });
                }
                Message::Entries(Entries {
                    repair,
                    digest,
                    entries,
                })
            }
            MessageType::Fragment => {
                let key = reader.key()?;
                let version = reader.version()?;
                let total_len = reader.u32()?;
                let offset = reader.u32()?;
                let chunk_len = reader.u16()? as usize;
                let chunk = reader.take(chunk_len)?.to_vec();
                if chunk.is_empty() || offset as u64 + chunk.len() as u64 > total_len as u64 {
                    return Err(DecodeError::Malformed);
                }
                Message::Fragment(Fragment {
                    key,
                    version,
                    total_len,
                    offset,
                    chunk,
                })
            }
            MessageType::BucketDigests => {
                let digest = reader.u64()?;
                let first = reader.u16()?;
                let end = reader.u16()?;
                let count = reader.u16()? as usize;
                if first > end || count > reader.bytes.len() / BUCKET_DIGEST_LEN {
                    return Err(DecodeError::Malformed);
                }
                let mut buckets = Vec::with_capacity(count);
                for _ in 0..count {
                    let bucket = reader.u16()?;
                    let summary = BucketSummary {
                        digest: reader.u64()?,
                        count: reader.u16()? as u32,
                        max_hlc: Hlc(reader.u64()?),
                    };
                    // Listed buckets must be ascending and inside the range,
                    // so a receiver can walk the list and the range together.
                    if bucket < first
                        || bucket >= end
                        || buckets.last().is_some_and(|&(last, _)| bucket <= last)
                    {
                        return Err(DecodeError::Malformed);
                    }
                    buckets.push((bucket, summary));
                }
                Message::BucketDigests(BucketDigests {
                    digest,
                    first,
                    end,
                    buckets,
                })
            }
        };
        reader.finish()?;
        Ok(message)
    }
}

/// Encodes an unencrypted datagram.
pub fn encode(header: &Header, message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    header.emit(&mut out);
    message.emit_payload(&mut out);
    out
}

/// Decodes an unencrypted datagram.
pub fn decode(bytes: &[u8]) -> Result<(Header, Message), DecodeError> {
    let packet = Packet::new_checked(bytes)?;
    if packet.is_encrypted() {
        return Err(DecodeError::BadKey);
    }
    let message = Message::parse_payload(packet.message_type(), packet.body())?;
    Ok((packet.header(), message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(message_type: MessageType) -> Header {
        Header {
            message_type,
            flags: 0,
            key_id: 0,
            sender: NodeId(0x0102_0304_0506_0708),
            boot: 0x0a0b_0c0d,
            seq: 7,
        }
    }

    #[test]
    fn summary_golden_bytes() {
        let message = Message::Summary(Summary {
            digest: 0x1122_3344_5566_7788,
            entries: 3,
            clock: Hlc::new(1, 2),
        });
        let bytes = encode(&header(MessageType::Summary), &message);
        assert_eq!(
            bytes,
            [
                0x47, 0x57, 1, 1, 0, 0, 0, 0, // magic, version, type, flags, key id, reserved
                1, 2, 3, 4, 5, 6, 7, 8, // sender
                0x0a, 0x0b, 0x0c, 0x0d, 0, 0, 0, 7, // boot, seq
                0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, // digest
                0, 0, 0, 3, // entries
                0, 0, 0, 0, 0, 1, 0, 2, // clock
            ]
        );
        assert_eq!(
            decode(&bytes).unwrap(),
            (header(MessageType::Summary), message)
        );
    }

    #[test]
    fn entry_golden_bytes() {
        let mut out = Vec::new();
        let version = Version {
            hlc: Hlc::new(0x0102, 3),
            origin: NodeId(9),
        };
        emit_entry("ab", version, Some(b"1"), &mut out);
        assert_eq!(
            out,
            [
                0, 2, b'a', b'b', 0, 0, 0, 0, 0x01, 0x02, 0, 3, 0, 0, 0, 0, 0, 0, 0, 9, 1, 0, 0, 0,
                1, b'1'
            ]
        );
        assert_eq!(out.len(), WireEntry::encoded_len("ab", Some(b"1")));
    }

    #[test]
    fn entries_golden_bytes() {
        let message = Message::Entries(Entries {
            repair: Some(RepairTag {
                bucket: 0x0102,
                digest: 0x1122_3344_5566_7788,
            }),
            digest: Some(0x0a0b_0c0d_0e0f_1011),
            entries: vec![WireEntry {
                key: "k".into(),
                version: Version {
                    hlc: Hlc::new(1, 2),
                    origin: NodeId(3),
                },
                value: None,
            }],
        });
        let head = header(MessageType::Entries);
        let bytes = encode(&head, &message);
        assert_eq!(
            bytes[HEADER_LEN..],
            [
                3, 0x01, 0x02, // kind (a repair, a digest follows), bucket
                0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, // bucket digest
                0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11, // sender's digest
                0, 1, // count
                0, 1, b'k', // key
                0, 0, 0, 0, 0, 1, 0, 2, // hlc
                0, 0, 0, 0, 0, 0, 0, 3, // origin
                0, // tombstone
            ]
        );
        assert_eq!(bytes[3], MessageType::Entries as u8);
        assert_eq!(decode(&bytes).unwrap(), (head, message));
        let mut unknown_kind = bytes.clone();
        unknown_kind[HEADER_LEN] = 4;
        assert_eq!(decode(&unknown_kind), Err(DecodeError::Malformed));
    }

    #[test]
    fn fragment_golden_bytes() {
        let message = Message::Fragment(Fragment {
            key: "big".into(),
            version: Version {
                hlc: Hlc::new(1, 0),
                origin: NodeId(2),
            },
            total_len: 10,
            offset: 8,
            chunk: vec![0xaa, 0xbb],
        });
        let head = header(MessageType::Fragment);
        let bytes = encode(&head, &message);
        assert_eq!(
            bytes[HEADER_LEN..],
            [
                0, 3, b'b', b'i', b'g', // key
                0, 0, 0, 0, 0, 1, 0, 0, // hlc
                0, 0, 0, 0, 0, 0, 0, 2, // origin
                0, 0, 0, 10, // total
                0, 0, 0, 8, // offset
                0, 2, 0xaa, 0xbb, // chunk
            ]
        );
        assert_eq!(bytes[3], 3);
        assert_eq!(decode(&bytes).unwrap(), (head, message));
    }

    #[test]
    fn bucket_digests_golden_bytes() {
        let message = Message::BucketDigests(BucketDigests {
            digest: 0x0102_0304_0506_0708,
            first: 0,
            end: 256,
            buckets: vec![(
                5,
                BucketSummary {
                    digest: 9,
                    count: 70_000,
                    max_hlc: Hlc::new(1, 1),
                },
            )],
        });
        let head = header(MessageType::BucketDigests);
        let bytes = encode(&head, &message);
        assert_eq!(
            bytes[HEADER_LEN..],
            [
                1, 2, 3, 4, 5, 6, 7, 8, // digest
                0, 0, 1, 0, // first, end
                0, 1, // count
                0, 5, // bucket
                0, 0, 0, 0, 0, 0, 0, 9, // bucket digest
                0xff, 0xff, // entries, saturated at u16
                0, 0, 0, 0, 0, 1, 0, 1, // max hlc
            ]
        );
        assert_eq!(bytes[3], 4);
        assert!(decode(&bytes).is_ok());
    }

    #[test]
    fn the_header_is_parsed_once_into_a_checked_view() {
        let mut head = header(MessageType::Summary);
        head.flags = FLAG_ENCRYPTED | FLAG_LOSS_SEEN;
        head.key_id = 42;
        let mut bytes = head.to_bytes().to_vec();
        bytes.extend_from_slice(b"body");
        let packet = Packet::new_checked(&bytes).unwrap();
        assert_eq!(packet.header(), head);
        assert!(packet.is_encrypted());
        assert_eq!(packet.key_id(), 42);
        assert_eq!(packet.header_bytes(), &bytes[..HEADER_LEN]);
        assert_eq!(packet.body(), b"body");
        for len in 0..HEADER_LEN {
            assert!(Packet::new_checked(&bytes[..len]).is_err(), "{len} bytes");
        }
    }

    #[test]
    fn a_set_reserved_field_is_refused() {
        let mut bytes = encode(
            &header(MessageType::Summary),
            &Message::Summary(Summary {
                digest: 0,
                entries: 0,
                clock: Hlc::ZERO,
            }),
        );
        bytes[7] = 1;
        assert_eq!(decode(&bytes), Err(DecodeError::ReservedSet));
    }

    #[test]
    fn every_message_round_trips() {
        let version = Version {
            hlc: Hlc::new(5, 1),
            origin: NodeId(2),
        };
        let messages = [
            Message::Entries(Entries {
                repair: Some(RepairTag {
                    bucket: 7,
                    digest: 99,
                }),
                digest: None,
                entries: vec![
                    WireEntry {
                        key: "scene/1".into(),
                        version,
                        value: Some(b"{\"on\":true}".to_vec()),
                    },
                    WireEntry {
                        key: "room/2".into(),
                        version,
                        value: None,
                    },
                ],
            }),
            Message::Fragment(Fragment {
                key: "big".into(),
                version,
                total_len: 10,
                offset: 4,
                chunk: vec![1, 2, 3],
            }),
            Message::BucketDigests(BucketDigests {
                digest: 1,
                first: 0,
                end: 256,
                buckets: vec![
                    (
                        3,
                        BucketSummary {
                            digest: 4,
                            count: 2,
                            max_hlc: Hlc(8),
                        },
                    ),
                    (
                        200,
                        BucketSummary {
                            digest: 5,
                            count: 1,
                            max_hlc: Hlc(9),
                        },
                    ),
                ],
            }),
        ];
        for message in messages {
            let head = header(message.message_type());
            let bytes = encode(&head, &message);
            assert_eq!(decode(&bytes).unwrap(), (head, message));
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let message = Message::Entries(Entries {
            repair: None,
            digest: Some(1),
            entries: vec![WireEntry {
                key: "k".into(),
                version: Version::default(),
                value: Some(vec![7; 40]),
            }],
        });
        let bytes = encode(&header(MessageType::Entries), &message);
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
    }

    #[test]
    fn foreign_and_future_datagrams_are_named_errors() {
        let mut bytes = encode(
            &header(MessageType::Summary),
            &Message::Summary(Summary {
                digest: 0,
                entries: 0,
                clock: Hlc::ZERO,
            }),
        );
        let mut future = bytes.clone();
        future[2] = PROTOCOL_VERSION + 1;
        assert_eq!(decode(&future), Err(DecodeError::UnknownVersion));
        let mut unknown = bytes.clone();
        unknown[3] = 200;
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownType));
        bytes[0] = b'X';
        assert_eq!(decode(&bytes), Err(DecodeError::BadMagic));
    }

    #[test]
    fn a_count_larger_than_the_datagram_is_refused_before_allocating() {
        let mut bytes = Vec::new();
        header(MessageType::Entries).emit(&mut bytes);
        bytes.extend_from_slice(&[0, 0xff, 0xff]);
        assert_eq!(decode(&bytes), Err(DecodeError::Truncated));
    }
}
