//! Entries, per-key versions, the merge rule, tombstones and digests.
//!
//! **Merge rule.** Every entry carries its own [`Version`]; the larger
//! version wins (last writer wins, per key). Versions are a total order
//! shared by every gateway, so every gateway picks the same winner whatever
//! order datagrams arrive in. Equal versions with different contents can only
//! come from a node-id clash (cloned images); the value bytes break that tie
//! so the group still converges.
//!
//! **Deletes** are tombstones: an entry with no value. A tombstone lives for
//! `tombstone_ttl_ms` of HLC time, long enough for every gateway that still
//! holds the old value to hear it, and is then purged so deleted keys do not
//! use flash forever. A tombstone that arrives already expired still deletes
//! an older value but is not kept.
//!
//! **Digests.** The key space is split into [`BUCKETS`] buckets by a hash of
//! the key. Each bucket's digest is the XOR of its entries' hashes, updated
//! incrementally on every change; the summary digest is the XOR of all
//! buckets. XOR of fixed-width hashes is order-independent, so two gateways
//! with the same entries have the same digests whatever order they learned
//! them in. All hashing is over explicit big-endian bytes, so digests are
//! identical on every architecture and byte order.

use super::clock::{Hlc, Version};

/// Number of digest buckets. A power of two; changing it changes the wire
/// protocol (bucket indexes and digests are exchanged).
pub const BUCKETS: usize = 256;

/// Store limits, each with its unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    pub entries_max: usize,
    /// Keys plus values of all entries, tombstones included.
    pub store_bytes_max: usize,
    pub tombstone_ttl_ms: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            key_bytes_max: 256,
            value_bytes_max: 64 * 1024,
            entries_max: 100_000,
            store_bytes_max: 16 * 1024 * 1024,
            tombstone_ttl_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// One entry: a version and a JSON value, or no value for a tombstone.
/// The owned form, as merged in and read from the wire or a state file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub version: Version,
    pub value: Option<Box<[u8]>>,
}

impl Entry {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    pub fn as_ref(&self) -> EntryRef<'_> {
        EntryRef {
            version: self.version,
            value: self.value.as_deref(),
        }
    }
}

/// A stored entry, borrowed from the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub version: Version,
    pub value: Option<&'a [u8]>,
}

impl EntryRef<'_> {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    pub fn to_owned(self) -> Entry {
        Entry {
            version: self.version,
            value: self.value.map(Into::into),
        }
    }

    fn size(&self, key: &str) -> usize {
        key.len() + self.value.map_or(0, <[u8]>::len)
    }

    /// The total order used to merge: version first, then contents.
    fn beats(&self, other: &EntryRef<'_>) -> bool {
        (self.version, self.value) > (other.version, other.value)
    }
}

/// Why a write or a merged entry was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The key is empty or longer than `key_bytes_max`.
    KeyTooLong,
    /// The key holds a control character (a newline would split `list`'s
    /// one-key-per-line output, an escape would reach a terminal).
    KeyControlChar,
    /// The value is longer than `value_bytes_max`.
    ValueTooLarge,
    /// Storing it would pass `entries_max` or `store_bytes_max`.
    StoreFull,
}

/// What a merge did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Merged {
    /// The entry was newer and is now stored (or, for an expired tombstone,
    /// the older value it deletes was removed).
    Applied,
    /// We already hold this entry or a newer one.
    Stale,
    Rejected(Rejected),
}

pub use crate::proto::BucketSummary;

#[derive(Clone, Debug, Default)]
struct Bucket {
    entries: SortedEntries,
    digest: u64,
    /// Cached because repair compares it for every bucket of every digest
    /// message; it only grows on insert and is recomputed on removal.
    max_hlc: Hlc,
}

impl Bucket {
    fn summary(&self) -> BucketSummary {
        BucketSummary {
            digest: self.digest,
            count: self.entries.len() as u32,
            max_hlc: self.max_hlc,
        }
    }

    fn recompute_max_hlc(&mut self) {
        self.max_hlc = self
            .entries
            .versions()
            .map(|version| version.hlc)
            .max()
            .unwrap_or(Hlc::ZERO);
    }
}

/// One stored entry: the key and the value share one allocation, because
/// memory is the scarce resource on a router and most entries are small
/// (a separate allocation each would cost more than the bytes themselves).
#[derive(Clone, Debug)]
struct Slot {
    version: Version,
    key_then_value: Box<[u8]>,
    key_len: u32,
    tombstone: bool,
}

impl Slot {
    fn new(key: &str, entry: EntryRef<'_>) -> Slot {
        let value = entry.value.unwrap_or_default();
        let mut key_then_value = Vec::with_capacity(key.len() + value.len());
        key_then_value.extend_from_slice(key.as_bytes());
        key_then_value.extend_from_slice(value);
        Slot {
            version: entry.version,
            key_then_value: key_then_value.into_boxed_slice(),
            key_len: key.len() as u32,
            tombstone: entry.value.is_none(),
        }
    }

    fn key_bytes(&self) -> &[u8] {
        &self.key_then_value[..self.key_len as usize]
    }

    fn key(&self) -> &str {
        // Slots are only built from a `&str` key, so this cannot fail; the
        // fallback keeps a broken invariant from becoming a panic.
        std::str::from_utf8(self.key_bytes()).unwrap_or_default()
    }

    fn entry(&self) -> EntryRef<'_> {
        EntryRef {
            version: self.version,
            value: (!self.tombstone).then(|| &self.key_then_value[self.key_len as usize..]),
        }
    }
}

/// One bucket's entries, sorted by key. A sorted vector instead of a
/// `BTreeMap` for memory too: a bucket holds tens to a few hundred entries,
/// where B-tree nodes stay about half full and cost nearly twice the
/// entries' own size, and where inserting by shifting is cheap. Growth is
/// in small steps for the same reason.
#[derive(Clone, Debug, Default)]
struct SortedEntries(Vec<Slot>);

impl SortedEntries {
    fn position(&self, key: &str) -> Result<usize, usize> {
        // Byte order is str order, and skips re-validating UTF-8 per step.
        self.0
            .binary_search_by(|slot| slot.key_bytes().cmp(key.as_bytes()))
    }

    fn get(&self, key: &str) -> Option<EntryRef<'_>> {
        self.position(key).ok().map(|index| self.0[index].entry())
    }

    /// Stores `entry` under `key`; returns the hash of the entry it
    /// replaced, 0 if none.
    fn insert(&mut self, key: &str, entry: EntryRef<'_>) -> u64 {
        let slot = Slot::new(key, entry);
        match self.position(key) {
            Ok(index) => {
                let old = std::mem::replace(&mut self.0[index], slot);
                entry_hash(key, old.entry())
            }
            Err(index) => {
                if self.0.len() == self.0.capacity() {
                    self.0.reserve_exact(self.0.len() / 8 + 1);
                }
                self.0.insert(index, slot);
                0
            }
        }
    }

    /// Removes `key`; returns the hash and size of what was removed.
    fn remove(&mut self, key: &str) -> Option<(u64, usize)> {
        let index = self.position(key).ok()?;
        let old = self.0.remove(index);
        if self.0.capacity() > 2 * self.0.len() + 8 {
            self.0.shrink_to(self.0.len() + self.0.len() / 8);
        }
        Some((entry_hash(key, old.entry()), old.entry().size(key)))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = (&str, EntryRef<'_>)> {
        self.0.iter().map(|slot| (slot.key(), slot.entry()))
    }

    fn versions(&self) -> impl Iterator<Item = Version> {
        self.0.iter().map(|slot| slot.version)
    }
}

/// The replicated data set of one gateway.
#[derive(Clone, Debug)]
pub struct Store {
    limits: StoreLimits,
    buckets: Vec<Bucket>,
    entries: usize,
    bytes: usize,
    digest: u64,
}

/// FNV-1a over explicit bytes, finished with the splitmix64 mixer so that
/// XOR-combining entry hashes stays well distributed.
#[derive(Clone, Copy)]
pub(crate) struct StableHasher(u64);

impl StableHasher {
    pub(crate) fn new() -> Self {
        StableHasher(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> &mut Self {
        for &byte in bytes {
            self.0 ^= byte as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    pub(crate) fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The bucket a key belongs to; the same on every gateway.
pub fn bucket_of(key: &str) -> usize {
    (StableHasher::new().write(key.as_bytes()).finish() as usize) & (BUCKETS - 1)
}

/// An entry's share of its bucket's digest (which is the XOR of them).
pub fn entry_hash(key: &str, entry: EntryRef<'_>) -> u64 {
    let mut hasher = StableHasher::new();
    hasher
        .write(&(key.len() as u32).to_be_bytes())
        .write(key.as_bytes())
        .write(&entry.version.hlc.0.to_be_bytes())
        .write(&entry.version.origin.0.to_be_bytes());
    match entry.value {
        Some(value) => hasher.write(&[1]).write(value),
        None => hasher.write(&[0]),
    };
    hasher.finish()
}

impl Store {
    pub fn new(limits: StoreLimits) -> Store {
        Store {
            limits,
            buckets: vec![Bucket::default(); BUCKETS],
            entries: 0,
            bytes: 0,
            digest: 0,
        }
    }

    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// The summary digest: equal on two gateways exactly when (up to hash
    /// collisions) they hold the same entries.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Number of entries, tombstones included.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn get(&self, key: &str) -> Option<EntryRef<'_>> {
        self.buckets[bucket_of(key)].entries.get(key)
    }

    pub fn bucket_summary(&self, bucket: usize) -> BucketSummary {
        self.buckets[bucket].summary()
    }

    /// The entries of one bucket, in key order.
    pub fn bucket_entries(&self, bucket: usize) -> impl Iterator<Item = (&str, EntryRef<'_>)> {
        self.buckets[bucket].entries.iter()
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, EntryRef<'_>)> {
        self.buckets.iter().flat_map(|bucket| bucket.entries.iter())
    }

    /// The newest timestamp held; a restarted clock resumes after it.
    pub fn max_hlc(&self) -> Hlc {
        self.buckets
            .iter()
            .map(|bucket| bucket.max_hlc)
            .max()
            .unwrap_or(Hlc::ZERO)
    }

    /// The version of the newest entry held: every gateway holding the same
    /// data agrees on it.
    pub fn newest_version(&self) -> Option<Version> {
        let bucket = self
            .buckets
            .iter()
            .filter(|bucket| bucket.entries.len() > 0)
            .max_by_key(|bucket| bucket.max_hlc)?;
        bucket.entries.versions().max()
    }

    /// Checks a key and value against the limits without storing anything.
    /// The one check every key passes, whatever brought it (CLI, control
    /// socket, C API, network, state file).
    pub fn check(&self, key: &str, value: Option<&[u8]>) -> Result<(), Rejected> {
        if key.is_empty() || key.len() > self.limits.key_bytes_max {
            return Err(Rejected::KeyTooLong);
        }
        if key.chars().any(char::is_control) {
            return Err(Rejected::KeyControlChar);
        }
        if value.is_some_and(|value| value.len() > self.limits.value_bytes_max) {
            return Err(Rejected::ValueTooLarge);
        }
        Ok(())
    }

    fn expired(&self, entry: EntryRef<'_>, now: Hlc) -> bool {
        entry.is_tombstone()
            && entry
                .version
                .hlc
                .physical_ms()
                .saturating_add(self.limits.tombstone_ttl_ms)
                < now.physical_ms()
    }

    /// Merges one entry by the last-writer-wins rule. `now` is the local
    /// clock's current timestamp, used only to recognise expired tombstones.
    pub fn merge(&mut self, key: &str, entry: Entry, now: Hlc) -> Merged {
        let entry = entry.as_ref();
        if let Err(rejected) = self.check(key, entry.value) {
            return Merged::Rejected(rejected);
        }
        let bucket_index = bucket_of(key);
        let old = self.buckets[bucket_index].entries.get(key);
        if let Some(old) = old {
            if !entry.beats(&old) {
                return Merged::Stale;
            }
        }
        let old_size = old.map_or(0, |old| old.size(key));
        if self.expired(entry, now) {
            if old.is_none() {
                return Merged::Stale;
            }
            self.remove(bucket_index, key);
            return Merged::Applied;
        }
        let new_size = entry.size(key);
        let new_entries = self.entries + usize::from(old.is_none());
        if new_entries > self.limits.entries_max
            || self.bytes - old_size + new_size > self.limits.store_bytes_max
        {
            return Merged::Rejected(Rejected::StoreFull);
        }
        let hash = entry_hash(key, entry);
        let bucket = &mut self.buckets[bucket_index];
        bucket.max_hlc = bucket.max_hlc.max(entry.version.hlc);
        let old_hash = bucket.entries.insert(key, entry);
        bucket.digest ^= old_hash ^ hash;
        self.digest ^= old_hash ^ hash;
        self.entries = new_entries;
        self.bytes = self.bytes - old_size + new_size;
        Merged::Applied
    }

    /// Removes a key outright (no tombstone): for an entry this gateway
    /// should never have taken, as one from beyond the clock bound after
    /// our own clock was set back.
    pub fn forget(&mut self, key: &str) {
        self.remove(bucket_of(key), key);
    }

    fn remove(&mut self, bucket_index: usize, key: &str) {
        let bucket = &mut self.buckets[bucket_index];
        if let Some((hash, size)) = bucket.entries.remove(key) {
            bucket.recompute_max_hlc();
            bucket.digest ^= hash;
            self.digest ^= hash;
            self.entries -= 1;
            self.bytes -= size;
        }
    }

    /// Removes tombstones older than the time-to-live; returns how many.
    pub fn purge_expired(&mut self, now: Hlc) -> usize {
        let expired: Vec<(usize, Box<str>)> = self
            .buckets
            .iter()
            .enumerate()
            .flat_map(|(index, bucket)| {
                bucket
                    .entries
                    .iter()
                    .filter(|(_, entry)| self.expired(*entry, now))
                    .map(move |(key, _)| (index, Box::<str>::from(key)))
            })
            .collect();
        for (index, key) in &expired {
            self.remove(*index, key);
        }
        expired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::NodeId;

    fn version(ms: u64, origin: u64) -> Version {
        Version {
            hlc: Hlc::new(ms, 0),
            origin: NodeId(origin),
        }
    }

    fn value(ms: u64, origin: u64, text: &str) -> Entry {
        Entry {
            version: version(ms, origin),
            value: Some(text.as_bytes().into()),
        }
    }

    fn tombstone(ms: u64, origin: u64) -> Entry {
        Entry {
            version: version(ms, origin),
            value: None,
        }
    }

    const NOW: Hlc = Hlc(1_000_000 << 16);

    #[test]
    fn newer_version_wins_whatever_the_arrival_order() {
        let mut a = Store::new(StoreLimits::default());
        let mut b = Store::new(StoreLimits::default());
        a.merge("k", value(1, 1, "1"), NOW);
        a.merge("k", value(2, 1, "2"), NOW);
        b.merge("k", value(2, 1, "2"), NOW);
        assert_eq!(b.merge("k", value(1, 1, "1"), NOW), Merged::Stale);
        assert_eq!(a.get("k"), b.get("k"));
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn same_timestamp_is_broken_by_origin_then_by_value() {
        let mut store = Store::new(StoreLimits::default());
        store.merge("k", value(5, 1, "low"), NOW);
        assert_eq!(store.merge("k", value(5, 2, "high"), NOW), Merged::Applied);
        assert_eq!(store.merge("k", value(5, 2, "a"), NOW), Merged::Stale);
        assert_eq!(store.merge("k", value(5, 2, "z"), NOW), Merged::Applied);
    }

    #[test]
    fn delete_beats_an_older_write_and_loses_to_a_newer_one() {
        let mut store = Store::new(StoreLimits::default());
        store.merge("k", value(1, 1, "old"), NOW);
        assert_eq!(store.merge("k", tombstone(2, 2), NOW), Merged::Applied);
        assert!(store.get("k").unwrap().is_tombstone());
        assert_eq!(store.merge("k", value(1, 1, "old"), NOW), Merged::Stale);
        assert_eq!(store.merge("k", value(3, 1, "new"), NOW), Merged::Applied);
        assert!(!store.get("k").unwrap().is_tombstone());
    }

    #[test]
    fn digest_is_incremental_and_order_independent() {
        let mut forward = Store::new(StoreLimits::default());
        let mut backward = Store::new(StoreLimits::default());
        let keys: Vec<String> = (0..500).map(|i| format!("home/{i}")).collect();
        for (i, key) in keys.iter().enumerate() {
            forward.merge(key, value(i as u64 + 1, 1, "x"), NOW);
        }
        for (i, key) in keys.iter().enumerate().rev() {
            backward.merge(key, value(i as u64 + 1, 1, "x"), NOW);
        }
        assert_eq!(forward.digest(), backward.digest());
        for bucket in 0..BUCKETS {
            assert_eq!(
                forward.bucket_summary(bucket),
                backward.bucket_summary(bucket)
            );
        }
        backward.merge("home/7", value(10_000, 2, "y"), NOW);
        assert_ne!(forward.digest(), backward.digest());
        let differing: Vec<usize> = (0..BUCKETS)
            .filter(|&b| forward.bucket_summary(b) != backward.bucket_summary(b))
            .collect();
        assert_eq!(differing, vec![bucket_of("home/7")]);
    }

    /// Golden values: digests must be identical on every architecture, so a
    /// change here is a wire-protocol change.
    #[test]
    fn digest_golden_values() {
        assert_eq!(bucket_of("home/1/scene"), 0xa1);
        let mut store = Store::new(StoreLimits::default());
        store.merge(
            "home/1/scene",
            value(1_700_000_000_000, 0x42, "{\"on\":true}"),
            NOW,
        );
        assert_eq!(store.digest(), 0xf963_639e_c120_e56e);
    }

    #[test]
    fn expired_tombstones_are_purged_and_not_stored_again() {
        let limits = StoreLimits {
            tombstone_ttl_ms: 100,
            ..StoreLimits::default()
        };
        let mut store = Store::new(limits);
        store.merge("gone", value(1, 1, "v"), Hlc::new(10, 0));
        store.merge("gone", tombstone(20, 1), Hlc::new(20, 0));
        assert_eq!(store.purge_expired(Hlc::new(50, 0)), 0);
        assert_eq!(store.purge_expired(Hlc::new(500, 0)), 1);
        assert!(store.is_empty());
        assert_eq!(store.digest(), 0);
        assert_eq!(
            store.merge("gone", tombstone(20, 1), Hlc::new(500, 0)),
            Merged::Stale
        );
        store.merge("old", value(1, 1, "v"), Hlc::new(500, 0));
        assert_eq!(
            store.merge("old", tombstone(2, 1), Hlc::new(500, 0)),
            Merged::Applied
        );
        assert!(store.get("old").is_none());
    }

    #[test]
    fn limits_reject_before_storing() {
        let limits = StoreLimits {
            key_bytes_max: 4,
            value_bytes_max: 3,
            entries_max: 1,
            ..StoreLimits::default()
        };
        let mut store = Store::new(limits);
        assert_eq!(
            store.merge("toolong", value(1, 1, "v"), NOW),
            Merged::Rejected(Rejected::KeyTooLong)
        );
        for bad in ["a\nb", "\t", "x\u{7f}", "\u{85}"] {
            assert_eq!(
                store.merge(bad, value(1, 1, "v"), NOW),
                Merged::Rejected(Rejected::KeyControlChar),
                "{bad:?}"
            );
        }
        assert_eq!(
            store.merge("k", value(1, 1, "long"), NOW),
            Merged::Rejected(Rejected::ValueTooLarge)
        );
        assert_eq!(store.merge("a", value(1, 1, "v"), NOW), Merged::Applied);
        assert_eq!(
            store.merge("b", value(1, 1, "v"), NOW),
            Merged::Rejected(Rejected::StoreFull)
        );
        assert_eq!(store.merge("a", value(2, 1, "w"), NOW), Merged::Applied);
        assert_eq!(store.len(), 1);
    }
}
