//! The sans-IO sync engine: the method of DESIGN section 1, with no sockets,
//! no threads, no clock reads and no global randomness.
//!
//! Time comes in as milliseconds on a monotonic clock (`now`) and, for
//! writes only, the wall clock (`wall_ms`); randomness comes from a seed.
//! The same inputs therefore always give the same outputs, which is what
//! lets the simulator in [`crate::sim`] replay any run exactly.
#![deny(unsafe_code)]

pub mod clock;
pub mod reassembly;
pub mod store;
pub mod trickle;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::crypto::{
    Accepted, CryptoError, Keyring, ReplayError, ReplayWindow, SEAL_OVERHEAD,
    SEALED_PAYLOAD_OFFSET, TAG_LEN,
};
use crate::wire::{
    self, BUCKET_DIGEST_LEN, BUCKET_DIGESTS_PREFIX, BucketDigests, DecodeError, ENTRIES_PREFIX_MAX,
    Entries, FRAGMENT_OVERHEAD, Fragment, HEADER_LEN, Header, Message, MessageType, Packet,
    RepairTag, Summary, WireEntry,
};
use clock::{Clock, Hlc, Version, remote_limit};
use reassembly::{Reassembly, ReassemblyLimits};
use store::{BUCKETS, BucketSummary, Entry, EntryRef, Merged, Rejected, Store, StoreLimits};
use trickle::{Trickle, TrickleConfig};

/// The generator behind every seeded random choice (engine timers, the
/// simulator's medium). ChaCha8's stream is fixed by its specification,
/// unlike `StdRng`'s, so a seed replays the same run after a dependency
/// update.
pub type SeededRng = ChaCha8Rng;

pub use crate::proto::NodeId;

/// Why a sync was requested from outside (method step 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerReason {
    /// The devices this gateway manages powered on.
    PowerOn,
    /// The devices reconnected.
    Reconnect,
    /// The network (re)initialised.
    NetworkUp,
    /// An operator or script asked for it.
    Manual,
}

/// Engine settings. Every field has a default; the names carry their units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub trickle: TrickleConfig,
    /// Writes that follow a push within this long wait for the end of it,
    /// so a burst leaves in as few full datagrams as possible. The first
    /// write after a quiet moment goes out at once.
    pub push_delay_ms: u64,
    /// Largest datagram sent, headers included.
    pub datagram_bytes_max: usize,
    /// Bytes the encryption layer adds to each datagram; set by the driver.
    pub seal_overhead_bytes: usize,
    pub store: StoreLimits,
    pub reassembly: ReassemblyLimits,
    /// Nothing heard from any other gateway for this long: ask the driver to
    /// rebuild its socket and re-join the group, then sync (method step 5).
    pub quiet_period_ms: u64,
    /// Answers (bucket digests, repairs) wait a random time below this, so
    /// that one gateway answers and the others hear it and stay quiet.
    pub response_window_ms: u64,
    /// A gateway that asked for a repair (sent its bucket digests because
    /// it lacks something) asks again when no repair arrived for this long
    /// and it still differs, at most `repair_requests_max` times per
    /// difference heard; the last time after `repair_bucket_interval_ms`,
    /// when an answer it lost may be sent again.
    pub repair_wait_ms: u64,
    pub repair_requests_max: u32,
    /// Besides the origin of a bucket's newest entry, which answers first,
    /// about this many other gateways (drawn at random per request) stand
    /// by to answer a repair request, so a request costs one answer, not
    /// one per gateway that missed the first.
    pub repair_volunteers: u32,
    /// Gap between repair datagrams from one gateway, so a large repair does
    /// not flood a Wi-Fi multicast link.
    pub repair_datagram_interval_ms: u64,
    /// A write pushed within this long after a lost datagram (or a
    /// difference that needed repair) was noticed is followed by a tail
    /// summary, so a peer that lost the push notices soon. On a clean LAN
    /// the push alone is the whole update.
    pub loss_memory_ms: u64,
    /// How many tail summaries follow a push on a lossy LAN; they go out
    /// after about `Imin/4`, `Imin/2`, `Imin`..., each skipped when a
    /// summary equal to ours was heard since the previous one. One is
    /// enough: a gateway that also lost it is mended by the repair that the
    /// others' requests bring, or asks again itself. (A one-datagram push
    /// is mostly followed by copies instead: see `tail_repeat_peers_min`.)
    pub tail_summaries: u32,
    /// On a lossy LAN a push of one datagram is sent again, evenly spaced
    /// from where the first tail summary would go, so that gateways that
    /// lost it need no repair round at all: as many copies as the loss
    /// rate lately needs (see `push_left_out_inverse`) in a group of the
    /// peers heard (of at least eight times this many, when this many were
    /// heard: Trickle keeps most of a large group quiet).
    pub tail_repeat_peers_min: usize,
    /// The copies of a lone push on a lossy LAN leave at most one update in
    /// this many with a gateway that lost them all; it then waits for a
    /// Trickle summary, seconds in an idle group. This is the trade between
    /// airtime and the p99: at 10 % loss 20 spends about one datagram less
    /// per update and puts the p99 at N = 32 and 128 at 6-7 s
    /// (bench/README.md, "Copies against the p99").
    pub push_left_out_inverse: u32,
    /// A datagram missed from a peer (a sequence gap) is answered with one
    /// summary of ours, so a lost push is noticed at the sender's next
    /// datagram; at most one such probe per this interval.
    pub gap_probe_interval_ms: u64,
    pub peers_max: usize,
    /// Datagrams one sender may have accepted per second (and in a burst).
    /// A repair sends about 1 / `repair_datagram_interval_ms` per ms.
    pub sender_datagrams_per_sec_max: u32,
    /// How often expired tombstones are purged.
    pub purge_interval_ms: u64,
    /// How far past this gateway's physical clock a peer's timestamp may
    /// be; anything further ahead is refused (see clock.rs).
    pub clock_ahead_max_ms: u64,
    /// The node id changes at most once per this interval, however much
    /// clash evidence arrives (each change is a flash write and a log line).
    pub node_id_change_interval_ms: u64,
    /// Repair bytes this gateway sends per second at most: a join (or a
    /// forged request that looks like one) is served at this pace.
    pub repair_bytes_per_sec_max: u64,
    /// A bucket repaired is not repaired again within this long, however
    /// many requests for it arrive: one answer per window serves them all.
    /// For a join-sized request (see [`JOIN_BUCKETS_MIN`]) that holds for
    /// the whole group: a bucket another gateway was heard sending, holding
    /// what we hold, is not sent by us either.
    pub repair_bucket_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            trickle: TrickleConfig {
                imin_ms: 100,
                imax_ms: 64_000,
                k: 1,
            },
            push_delay_ms: 2,
            datagram_bytes_max: 1400,
            seal_overhead_bytes: 0,
            store: StoreLimits::default(),
            reassembly: ReassemblyLimits::default(),
            quiet_period_ms: 320_000,
            response_window_ms: 40,
            repair_wait_ms: 60,
            repair_requests_max: 5,
            repair_volunteers: 2,
            repair_datagram_interval_ms: 2,
            loss_memory_ms: 600_000,
            tail_summaries: 1,
            tail_repeat_peers_min: 4,
            push_left_out_inverse: 200,
            gap_probe_interval_ms: 1_000,
            peers_max: 256,
            sender_datagrams_per_sec_max: 2_000,
            purge_interval_ms: 60_000,
            clock_ahead_max_ms: 300_000,
            node_id_change_interval_ms: 600_000,
            repair_bytes_per_sec_max: 512 * 1024,
            repair_bucket_interval_ms: 1_000,
        }
    }
}

/// A request for at least this many buckets is join-sized: the requester
/// lacks a good part of the store (it is new, or was away long), or it is a
/// forger asking for everything. Such a request is served once per
/// `repair_bucket_interval_ms` by the whole group, not once per request or
/// per gateway: the store is the one answer an attacker can draw at will,
/// and ten requests (or ten joiners) must not draw it ten times.
pub const JOIN_BUCKETS_MIN: usize = BUCKETS / 4;

/// Differing summary digests remembered while each waits to be heard again
/// (see `on_summary`): enough for the few states an honest group shows at
/// once; a forger cycling through more only delays a confirmation.
const DIFFERENCES_HELD: usize = 4;

/// Something the embedding program should know about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An entry changed, by a local write or from the network. `value` is
    /// `None` when the key was deleted.
    Changed {
        key: String,
        value: Option<Box<[u8]>>,
        origin: NodeId,
    },
    /// A gateway was heard for the first time since start.
    PeerDiscovered(NodeId),
    /// Nothing was heard for the quiet period: close the socket, open a new
    /// one and re-join the group (method step 5).
    RebuildSocket,
    /// Another gateway uses our node id (a cloned image); we took a new one.
    NodeIdClash { old: NodeId, new: NodeId },
}

/// Why a local write was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteError {
    /// The key is empty, longer than `key_bytes_max` or holds a control
    /// character.
    InvalidKey,
    /// The value is longer than `value_bytes_max`.
    ValueTooLarge,
    /// The store is at `entries_max` or `store_bytes_max`.
    StoreFull,
    /// Delete of a key that holds no value.
    NotFound,
    /// The key's stored version is the largest there is, so no write can be
    /// newer (only a state file from before the clock bound can hold one).
    VersionExhausted,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WriteError::InvalidKey => "key is empty, too long or holds a control character",
            WriteError::ValueTooLarge => "value is too large",
            WriteError::StoreFull => "store is full",
            WriteError::NotFound => "key not found",
            WriteError::VersionExhausted => {
                "the key holds the largest possible version; no newer write exists"
            }
        })
    }
}

impl std::error::Error for WriteError {}

impl WriteError {
    /// The error for a person: names the key and the limit it hit.
    /// `value_bytes` is the refused value's size (0 for a delete).
    pub fn explain(self, key: &str, value_bytes: usize, limits: &StoreLimits) -> String {
        let shown = shown_key(key);
        match self {
            WriteError::InvalidKey if key.is_empty() => "the key is empty".to_owned(),
            WriteError::InvalidKey if key.len() > limits.key_bytes_max => format!(
                "key {shown} is too long: {} bytes; the limit is {} bytes",
                key.len(),
                limits.key_bytes_max
            ),
            WriteError::InvalidKey => {
                let (at, bad) = key
                    .char_indices()
                    .find(|(_, c)| c.is_control())
                    .unwrap_or((0, '?'));
                format!(
                    "key {shown} holds control character U+{:04X} at byte {at}; keys may not hold control characters",
                    u32::from(bad)
                )
            }
            WriteError::ValueTooLarge => format!(
                "value for key {shown} is too large: {value_bytes} bytes; the limit is {} bytes",
                limits.value_bytes_max
            ),
            WriteError::StoreFull => format!(
                "store is full, key {shown} not stored; the limits are {} entries and {} bytes of keys and values (tombstones included)",
                limits.entries_max, limits.store_bytes_max
            ),
            WriteError::NotFound => format!("key not found: {shown}"),
            WriteError::VersionExhausted => format!("key {shown}: {self}"),
        }
    }
}

/// A key as an error message shows it: quoted with control characters
/// escaped, and cut short when long.
pub fn shown_key(key: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 64;
    match key.char_indices().nth(SHOWN_CHARS_MAX) {
        Some((cut, _)) => format!("{:?}...", &key[..cut]),
        None => format!("{key:?}"),
    }
}

impl From<Rejected> for WriteError {
    fn from(rejected: Rejected) -> Self {
        match rejected {
            Rejected::KeyTooLong | Rejected::KeyControlChar => WriteError::InvalidKey,
            Rejected::ValueTooLarge => WriteError::ValueTooLarge,
            Rejected::StoreFull => WriteError::StoreFull,
        }
    }
}

/// Why a received datagram (or part of one) was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    Decode(DecodeError),
    /// Our own datagram, looped back.
    Own,
    /// A repeated or too old (boot, sequence) from one sender.
    Replay(ReplayError),
    /// Failed to authenticate or decrypt under the group key.
    Crypto(CryptoError),
    /// The sender passed `sender_datagrams_per_sec_max`.
    RateLimited,
    /// An entry over a store limit.
    OverLimit,
    /// A fragment over a reassembly limit.
    ReassemblyFull,
    /// A new peer beyond `peers_max` displaced the least recently heard.
    PeerEvicted,
    /// A summary clock or bucket timestamp more than `clock_ahead_max_ms`
    /// past our physical clock: the whole datagram is refused.
    ClockAhead,
    /// An entry or fragment whose version is more than `clock_ahead_max_ms`
    /// past our physical clock.
    VersionAhead,
    /// Our node id with another boot, but not fresh evidence of a clone (not
    /// a summary sent after we started): a replay of an earlier boot of ours.
    OwnIdNotFresh,
    /// Fresh clash evidence within `node_id_change_interval_ms` of the last
    /// node id change.
    NodeIdChangePaced,
}

impl DropReason {
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Decode(error) => error.name(),
            DropReason::Own => "own",
            DropReason::Replay(error) => error.name(),
            DropReason::Crypto(error) => error.name(),
            DropReason::RateLimited => "rate_limited",
            DropReason::OverLimit => "over_limit",
            DropReason::ReassemblyFull => "reassembly_full",
            DropReason::PeerEvicted => "peer_evicted",
            DropReason::ClockAhead => "clock_ahead",
            DropReason::VersionAhead => "version_ahead",
            DropReason::OwnIdNotFresh => "own_id_not_fresh",
            DropReason::NodeIdChangePaced => "node_id_change_paced",
        }
    }
}

/// Running totals, for `gwsync status` and the benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
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
    /// Local writes refused with [`WriteError::VersionExhausted`].
    pub writes_version_exhausted: u64,
    /// Bucket repairs not sent because the bucket was repaired within
    /// `repair_bucket_interval_ms`.
    pub repairs_paced: u64,
    /// Times repair waited for `repair_bytes_per_sec_max`.
    pub repair_budget_waits: u64,
    /// Partial large values evicted to make room for a sender using less
    /// reassembly memory.
    pub reassembly_evictions: u64,
    /// Entries found beyond the clock bound after our clock was set back:
    /// others' are forgotten (the group refuses them too), ours written
    /// again with a version from the corrected clock.
    pub future_entries_forgotten: u64,
    pub dropped: BTreeMap<DropReason, u64>,
}

/// What we know of another gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub last_heard: u64,
    pub window: ReplayWindow,
    /// The summary digest it announced last (`status`: in sync or not).
    pub last_digest: Option<u64>,
    /// When we heard that digest, if it differed from ours then.
    last_difference_at: Option<u64>,
    /// Token bucket of datagrams this sender may still send (one token per
    /// millisecond up to the per-second limit), so a flood from one sender
    /// costs the others nothing.
    tokens: u32,
    tokens_at: u64,
}

impl Peer {
    fn new(now: u64, header: &Header, rate_max: u32) -> Peer {
        Peer {
            last_heard: now,
            window: ReplayWindow::new(header.boot, header.seq),
            last_digest: None,
            last_difference_at: None,
            tokens: rate_max,
            tokens_at: now,
        }
    }

    fn take_token(&mut self, now: u64, rate_max: u32) -> bool {
        let elapsed = now.saturating_sub(self.tokens_at);
        let refill = (elapsed.saturating_mul(rate_max as u64) / 1000).min(rate_max as u64) as u32;
        if refill > 0 {
            self.tokens = self.tokens.saturating_add(refill).min(rate_max);
            self.tokens_at = now;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Our bucket digests, scheduled.
#[derive(Clone, Copy, Debug)]
struct DigestsDue {
    due: u64,
    /// The digest of the gateway whose difference called for them; once
    /// ours equals it they are moot.
    against: u64,
    /// Sent because we lack something (a repair request), rather than to
    /// show a peer what it lacks: hearing the same request from another
    /// gateway then only postpones ours, and it is repeated while no
    /// repair comes.
    request: bool,
    requests_left: u32,
}

/// Enough to recognise a peer a few changes behind us; older ones matter
/// little (it then lacks several changes, and asks or is asked anyway).
const PAST_DIGESTS_KEPT: usize = 8;

/// Datagrams the loss estimate reflects (about the latest this many).
const LOSS_SAMPLE: u32 = 256;
/// One sequence gap counts at most this many datagrams missed.
const LOSS_GAP_COUNTED_MAX: u32 = 8;
/// Before the loss estimate has heard much, it leans on this prior: as if
/// `LOSS_PRIOR_SAMPLED` datagrams had been sampled with
/// `LOSS_PRIOR_MISSED` of them missed (20 %, heavy loss). Loss was seen,
/// or no copies would go out; too few copies cost seconds, too many a
/// datagram each.
const LOSS_PRIOR_SAMPLED: f64 = 4.0;
const LOSS_PRIOR_MISSED: f64 = 0.8;
/// However lossy the LAN (or a forger's sequence gaps make it look): the
/// copies of one push are bounded.
const PUSH_COPIES_MAX: u32 = 10;

/// What a summary (or a push carrying its sender's digest) told.
#[derive(Clone, Copy, Debug)]
struct Heard {
    digest: u64,
    /// The sender's clock (of a push: its newest entry).
    clock: Hlc,
    /// Our clock before the datagram.
    seen_before: Hlc,
    /// Datagrams from its sender were lost just before it.
    missed_some: bool,
    on_push: bool,
}

/// Summaries scheduled after a push on a lossy LAN.
#[derive(Clone, Debug)]
struct Tail {
    due: u64,
    gap_ms: u64,
    remaining: u32,
    consistent_heard: bool,
    /// Keys of a one-datagram push to send again before the summaries.
    repeat: Vec<String>,
    repeats_left: u32,
}

/// The sync engine of one gateway.
///
/// # Using it
///
/// Feed it input, then drain its output, then sleep until its deadline:
///
/// 1. Input: [`Engine::handle_datagram`] for every datagram received on the
///    group; [`Engine::set`] / [`Engine::delete`] for local writes;
///    [`Engine::trigger`] when devices power on or reconnect or the network
///    comes up; [`Engine::handle_timeout`] when the deadline has passed (a
///    spurious call is a harmless no-op).
/// 2. Output, after every input: send each [`Engine::poll_transmit`] datagram
///    to the multicast group until it returns `None`; handle each
///    [`Engine::poll_event`] (apply changes, rebuild the socket on
///    [`Event::RebuildSocket`], persist a new node id); persist the state
///    when [`Engine::state_generation`] has moved.
/// 3. Wait for the next datagram or until [`Engine::poll_timeout`].
///
/// The engine never blocks and never fails on network input: bad datagrams
/// are dropped and counted in [`Engine::counters`].
pub struct Engine {
    config: Config,
    node_id: NodeId,
    boot: u32,
    /// Our boot id before the sequence number wrapped, still ours.
    previous_boot: Option<u32>,
    seq: u32,
    keyring: Option<Keyring>,
    /// Nonces come from their own generator: the engine's `rng` is seeded
    /// from 64 bits for replayable simulation, too few for nonces.
    nonce_rng: StdRng,
    clock: Clock,
    store: Store,
    rng: SeededRng,
    trickle: Trickle,
    reassembly: Reassembly,
    peers: BTreeMap<NodeId, Peer>,
    last_heard_other: u64,
    pending_push: BTreeSet<String>,
    push_due: Option<u64>,
    last_push_at: Option<u64>,
    bucket_digests_due: Option<DigestsDue>,
    /// Buckets to send, each with the requester's digest of it when one
    /// requester asked (`None`: send the whole bucket).
    repair_queue: BTreeMap<u16, Option<u64>>,
    repair_due: Option<u64>,
    /// A repair of ours is under way (some of the queue already sent).
    repairing: bool,
    /// When we last saw loss first-hand: a sequence gap, or a difference
    /// that needed repair. Advertised in our headers.
    loss_seen_at: Option<u64>,
    /// When a peer last advertised first-hand loss. Second-hand evidence is
    /// not advertised again, so the flag dies out when the loss stops.
    loss_heard_at: Option<u64>,
    /// Datagrams heard from peers, and missed (sequence gaps), lately:
    /// both halve when their sum reaches [`LOSS_SAMPLE`].
    datagrams_heard: u32,
    datagrams_missed: u32,
    /// The latest time passed in, for stamping outgoing headers.
    now: u64,
    last_gap_probe: Option<u64>,
    tail: Option<Tail>,
    purge_due: u64,
    /// Wall clock minus monotonic time, from the last
    /// [`Engine::set_wall_clock`] or write: our physical clock.
    wall_offset_ms: Option<i64>,
    /// Our physical clock when we started: clash evidence must be newer.
    started_physical_ms: Option<u64>,
    last_node_id_change: Option<u64>,
    /// The digest of our last summary, and when it went out.
    announced: Option<(u64, u64)>,
    /// Our recent digests, oldest first, one per input that changed the
    /// data: a summary carrying one of them comes from a peer that lacks
    /// what we got since (a summary's clock is its sender's current time,
    /// so it cannot tell a peer behind us from one ahead).
    past_digests: VecDeque<u64>,
    /// Digests of summaries differing from our data heard since the last
    /// consistent one (the latest [`DIFFERENCES_HELD`]), each with when it
    /// was first heard. Bucket digests answer a difference only when its
    /// digest is heard again after our own summary went out (see
    /// `on_summary`).
    differences_heard: VecDeque<(u64, u64)>,
    /// Repair byte budget (may run below zero by one bucket).
    repair_budget_bytes: i64,
    repair_budget_at: u64,
    /// When each bucket was last sent in repair by us, and the requester's
    /// digest of it then.
    bucket_repaired_at: Box<[Option<(u64, u64)>; BUCKETS]>,
    /// When another gateway was last heard sending each bucket in repair
    /// while we held the same: it served every join-sized request of then.
    bucket_repair_heard_at: Box<[Option<u64>; BUCKETS]>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    counters: Counters,
    state_generation: u64,
}

impl Engine {
    /// An engine with an empty store, starting at monotonic time `now`.
    /// `seed` drives every random choice (timers, boot id, a new node id).
    pub fn new(config: Config, node_id: NodeId, seed: u64, now: u64) -> Engine {
        let mut rng = SeededRng::seed_from_u64(seed);
        let trickle = Trickle::new(config.trickle, now, &mut rng);
        Engine {
            node_id,
            boot: rng.random(),
            previous_boot: None,
            seq: 0,
            keyring: None,
            nonce_rng: StdRng::seed_from_u64(seed ^ 0x6e6f_6e63_6573_0000),
            clock: Clock::default(),
            store: Store::new(config.store),
            trickle,
            reassembly: Reassembly::new(config.reassembly),
            peers: BTreeMap::new(),
            last_heard_other: now,
            pending_push: BTreeSet::new(),
            push_due: None,
            last_push_at: None,
            bucket_digests_due: None,
            repair_queue: BTreeMap::new(),
            repair_due: None,
            repairing: false,
            loss_seen_at: None,
            loss_heard_at: None,
            datagrams_heard: 0,
            datagrams_missed: 0,
            now,
            last_gap_probe: None,
            tail: None,
            purge_due: now + config.purge_interval_ms,
            wall_offset_ms: None,
            started_physical_ms: None,
            last_node_id_change: None,
            announced: None,
            past_digests: VecDeque::new(),
            differences_heard: VecDeque::new(),
            repair_budget_bytes: config.repair_bytes_per_sec_max as i64,
            repair_budget_at: now,
            bucket_repaired_at: Box::new([None; BUCKETS]),
            bucket_repair_heard_at: Box::new([None; BUCKETS]),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            state_generation: 0,
            rng,
            config,
        }
    }

    /// Restores persisted state: entries and the clock's high-water mark.
    /// Call before the first input. Entries over a limit are skipped and
    /// counted, never half-loaded.
    pub fn restore(
        &mut self,
        clock_high_water: Hlc,
        entries: impl IntoIterator<Item = (String, Entry)>,
    ) {
        let now = Hlc::new(self.physical_ms(self.now), 0);
        for (key, entry) in entries {
            if let Merged::Rejected(_) = self.store.merge(&key, entry, now) {
                self.count_drop(DropReason::OverLimit);
            }
        }
        self.clock
            .observe(clock_high_water.max(self.store.max_hlc()));
    }

    /// Seals every datagram sent with the keyring's primary key and accepts
    /// only datagrams that open under one of its keys; `None` makes the group
    /// open again. `nonce_rng` must be seeded from the OS in production.
    pub fn set_keyring(&mut self, keyring: Option<Keyring>, nonce_rng: StdRng) {
        self.config.seal_overhead_bytes = if keyring.is_some() { SEAL_OVERHEAD } else { 0 };
        self.keyring = keyring;
        self.nonce_rng = nonce_rng;
    }

    pub fn is_keyed(&self) -> bool {
        self.keyring.is_some()
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn boot_id(&self) -> u32 {
        self.boot
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn clock_high_water(&self) -> Hlc {
        self.clock.high_water()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn peers(&self) -> &BTreeMap<NodeId, Peer> {
        &self.peers
    }

    /// Moves whenever something worth persisting changed (an entry, the
    /// node id). Compare with the generation last written.
    pub fn state_generation(&self) -> u64 {
        self.state_generation
    }

    /// True when nothing is pending but the periodic Trickle summary: no
    /// push, tail, answer or repair waiting to go out.
    pub fn is_idle(&self) -> bool {
        self.push_due.is_none()
            && self.tail.is_none()
            && self.bucket_digests_due.is_none()
            && self.repair_queue.is_empty()
    }

    /// The current Trickle interval; at `Imax` the gateway is in steady state.
    pub fn trickle_interval_ms(&self) -> u64 {
        self.trickle.interval_ms()
    }

    /// The current value of a key; `None` when absent or deleted.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.store.get(key).and_then(|entry| entry.value)
    }

    /// Writes a value (opaque bytes; the APIs above keep it JSON).
    pub fn set(
        &mut self,
        now: u64,
        wall_ms: u64,
        key: &str,
        value: &[u8],
    ) -> Result<(), WriteError> {
        self.write(now, wall_ms, key, Some(value))
    }

    /// Deletes a key, leaving a tombstone so the delete wins everywhere.
    pub fn delete(&mut self, now: u64, wall_ms: u64, key: &str) -> Result<(), WriteError> {
        if self.get(key).is_none() {
            return Err(WriteError::NotFound);
        }
        self.write(now, wall_ms, key, None)
    }

    fn write(
        &mut self,
        now: u64,
        wall_ms: u64,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), WriteError> {
        self.store.check(key, value)?;
        self.remember_digest();
        self.set_wall_clock(now, wall_ms);
        let ticked = self.clock.tick(wall_ms, self.config.clock_ahead_max_ms);
        // A stored version beyond the bound (taken while our own clock ran
        // ahead) is one the group refuses: a write replaces it rather than
        // following it, or the write would be refused too.
        if self
            .store
            .get(key)
            .is_some_and(|stored| stored.version.hlc > self.remote_limit())
        {
            self.store.forget(key);
            self.counters.future_entries_forgotten += 1;
        }
        // Per key, a write must be newer than what is stored, whatever the
        // clock says (see clock.rs); the largest version has no successor.
        let floor = match self.store.get(key) {
            None => Some(Hlc::ZERO),
            Some(stored) => stored.version.hlc.checked_successor(),
        };
        let Some(floor) = floor else {
            self.counters.writes_version_exhausted += 1;
            log::warn!("write to {key} refused: it holds the largest possible version");
            return Err(WriteError::VersionExhausted);
        };
        let version = Version {
            hlc: ticked.max(floor),
            origin: self.node_id,
        };
        self.clock.observe(version.hlc);
        let entry = Entry {
            version,
            value: value.map(Into::into),
        };
        let physical = Hlc::new(wall_ms, 0);
        match self.store.merge(key, entry, physical) {
            Merged::Applied => {}
            Merged::Rejected(rejected) => return Err(rejected.into()),
            // Only a tombstone written with a wall clock more than its
            // lifetime behind its own version can be stale here.
            Merged::Stale => {}
        }
        self.state_generation += 1;
        self.events.push_back(Event::Changed {
            key: key.to_owned(),
            value: value.map(Into::into),
            origin: self.node_id,
        });
        self.pending_push.insert(key.to_owned());
        if self.push_due.is_none() {
            // A lone write goes out at once; only writes that follow a
            // push within the window wait, and leave together.
            let window_end = self
                .last_push_at
                .map_or(now, |at| at + self.config.push_delay_ms);
            self.push_due = Some(window_end.max(now));
        }
        Ok(())
    }

    /// Merges one entry restored by an operator (`gwsync load`) by the
    /// normal rule, so an older entry never overwrites a newer one; an
    /// applied entry is announced to the group like a local write.
    pub fn load_entry(
        &mut self,
        now: u64,
        key: String,
        version: Version,
        value: Option<Box<[u8]>>,
    ) -> Merged {
        let pushed = key.clone();
        let merged = self.merge_entry(key, version, value);
        if merged == Merged::Applied {
            self.pending_push.insert(pushed);
            self.push_due.get_or_insert(now + self.config.push_delay_ms);
        }
        merged
    }

    /// Tells the engine the wall clock: `wall_ms` (ms since the Unix epoch)
    /// is the time at monotonic `now`. Call it at start and whenever the
    /// wall clock may have been set (the driver does before every input);
    /// remote timestamps are bounded against it and tombstones expire by
    /// it. Until it is called the clock's own high-water mark stands in.
    pub fn set_wall_clock(&mut self, now: u64, wall_ms: u64) {
        self.wall_offset_ms = Some(wall_ms as i64 - now as i64);
        self.started_physical_ms.get_or_insert(wall_ms);
    }

    /// Our physical clock at monotonic `now`.
    fn physical_ms(&self, now: u64) -> u64 {
        match self.wall_offset_ms {
            Some(offset) => (now as i64).saturating_add(offset).max(0) as u64,
            None => self.clock.high_water().physical_ms(),
        }
    }

    /// The newest timestamp accepted from a peer now.
    fn remote_limit(&self) -> Hlc {
        remote_limit(self.physical_ms(self.now), self.config.clock_ahead_max_ms)
    }

    /// Starts a sync request (method step 5): devices powered on or
    /// reconnected, the network came up, or someone asked.
    pub fn trigger(&mut self, now: u64, _reason: TriggerReason) {
        self.trickle.reset(now, &mut self.rng);
    }

    /// The next datagram to multicast, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Engine::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> u64 {
        [
            Some(self.trickle.next_deadline()),
            self.push_due,
            self.tail.as_ref().map(|tail| tail.due),
            self.bucket_digests_due.map(|digests| digests.due),
            self.repair_due,
            self.reassembly.next_deadline(),
            Some(self.last_heard_other + self.config.quiet_period_ms),
            Some(self.purge_due),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("the trickle deadline is always set")
    }

    /// Runs every timer whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: u64) {
        self.now = self.now.max(now);
        self.remember_digest();
        if self.push_due.is_some_and(|due| due <= now) {
            self.push_due = None;
            self.flush_push(now);
        }
        if self.trickle.on_timeout(now, &mut self.rng) {
            self.send_summary();
        }
        if let Some(mut tail) = self.tail.take_if(|tail| tail.due <= now) {
            let repeat = (tail.repeats_left > 0).then(|| {
                tail.repeats_left -= 1;
                if tail.repeats_left == 0 {
                    std::mem::take(&mut tail.repeat)
                } else {
                    tail.repeat.clone()
                }
            });
            if repeat.is_none() {
                if !tail.consistent_heard {
                    self.send_summary();
                }
                tail.remaining = tail.remaining.saturating_sub(1);
                tail.consistent_heard = false;
            }
            tail.due = now + tail.gap_ms;
            // Copies go out evenly spaced, summaries after doubling gaps.
            if repeat.is_none() {
                tail.gap_ms *= 2;
            }
            let finished = tail.remaining == 0 && tail.repeats_left == 0;
            // Sent with the tail in place, the last copy too: a receiver's
            // gap just before a copy is most likely the copies it lost.
            self.tail = Some(tail);
            if let Some(keys) = repeat {
                self.send_pushed(&keys);
            }
            if finished {
                self.tail = None;
            }
        }
        if let Some(mut digests) = self.bucket_digests_due.filter(|d| d.due <= now) {
            self.bucket_digests_due = None;
            if self.store.digest() != digests.against {
                self.send_bucket_digests();
                if digests.request && digests.requests_left > 1 {
                    // Asked for a repair: ask again if none comes. An answer
                    // we lost is not sent again to the same bucket digests
                    // within `repair_bucket_interval_ms`, so the last ask
                    // waits that out.
                    digests.requests_left -= 1;
                    let wait = self.config.repair_wait_ms;
                    digests.due = now
                        + if digests.requests_left == 1 {
                            wait.max(self.config.repair_bucket_interval_ms)
                        } else {
                            wait
                        };
                    self.bucket_digests_due = Some(digests);
                }
            }
        }
        if self.repair_due.is_some_and(|due| due <= now) {
            self.repair_due = None;
            self.repair_next(now);
        }
        self.reassembly.expire(now);
        if now >= self.last_heard_other + self.config.quiet_period_ms {
            // Method step 5. A single summary, not a Trickle reset: the one
            // gateway whose summaries always suppress everyone else's hears
            // nothing either, and a reset would cost the group a burst.
            self.last_heard_other = now;
            self.counters.socket_rebuilds += 1;
            self.events.push_back(Event::RebuildSocket);
            self.send_summary();
        }
        if now >= self.purge_due {
            self.purge_due = now + self.config.purge_interval_ms;
            // The physical clock, which no peer can move: tombstones live
            // their full lifetime whatever clocks the group hears.
            let physical = Hlc::new(self.physical_ms(now), 0);
            if self.store.purge_expired(physical) > 0 {
                self.state_generation += 1;
            }
            self.recheck_clock_bound(now);
        }
    }

    /// After our own clock was set back (it ran ahead), entries stored
    /// while it was ahead can lie beyond the bound: every other gateway
    /// refuses them, so keeping them would split us from the group until
    /// real time reaches them. They are forgotten (ours too: written again
    /// at the old version, a write would beat later writes of others), and
    /// repair brings back what the group holds for those keys.
    fn recheck_clock_bound(&mut self, now: u64) {
        let limit = self.remote_limit();
        let beyond: Vec<(String, Entry)> = self
            .store
            .iter()
            .filter(|(_, entry)| entry.version.hlc > limit)
            .map(|(key, entry)| (key.to_owned(), entry.to_owned()))
            .collect();
        if beyond.is_empty() {
            return;
        }
        let _ = now;
        for (key, Entry { version, .. }) in beyond {
            self.store.forget(&key);
            self.state_generation += 1;
            self.counters.future_entries_forgotten += 1;
            self.events.push_back(Event::Changed {
                key,
                value: None,
                origin: version.origin,
            });
        }
    }

    /// Takes one datagram received from the group.
    pub fn handle_datagram(&mut self, now: u64, bytes: &[u8]) {
        self.now = self.now.max(now);
        self.remember_digest();
        self.counters.datagrams_received += 1;
        self.counters.bytes_received += bytes.len() as u64;
        let (header, message) = match self.open(bytes) {
            Ok(decoded) => decoded,
            Err(reason) => return self.count_drop(reason),
        };
        // Only now, with the header authenticated (when keyed), may a
        // datagram claiming our id make us change it.
        if header.sender == self.node_id {
            return self.on_own_id(now, &message);
        }
        let missed_some = match self.hear_peer(now, &header) {
            Ok(missed_some) => missed_some,
            Err(reason) => return self.count_drop(reason),
        };
        if header.flags & wire::FLAG_LOSS_SEEN != 0 {
            self.loss_heard_at = Some(now);
        }
        // Only a push tells of writes we may have missed; a summary or
        // digests show any difference by themselves, and a missed repair is
        // asked for again by the request it answered.
        let push = match &message {
            Message::Entries(entries) => entries.repair.is_none(),
            Message::Fragment(_) => true,
            Message::Summary(_) | Message::BucketDigests(_) => false,
        };
        let mut summarised = false;
        match message {
            Message::Summary(summary) => {
                if summary.clock > self.remote_limit() {
                    return self.count_drop(DropReason::ClockAhead);
                }
                let seen_before = self.clock.high_water();
                let heard = Heard {
                    digest: summary.digest,
                    clock: summary.clock,
                    seen_before,
                    missed_some,
                    on_push: false,
                };
                self.on_summary(now, header.sender, heard)
            }
            Message::Entries(entries) => {
                let seen_before = self.clock.high_water();
                // Entries from beyond the clock bound were refused (and
                // counted) one by one: their digest tells nothing.
                let newest = entries.entries.iter().map(|entry| entry.version.hlc).max();
                let heard = entries
                    .digest
                    .zip(newest)
                    .filter(|&(_, newest)| newest <= self.remote_limit());
                self.on_entries(now, header.sender, entries);
                if let Some((digest, newest)) = heard {
                    summarised = true;
                    let heard = Heard {
                        digest,
                        clock: newest,
                        seen_before,
                        missed_some,
                        on_push: true,
                    };
                    self.on_summary(now, header.sender, heard);
                }
            }
            Message::Fragment(fragment) => self.on_fragment(now, header.sender, fragment),
            Message::BucketDigests(digests) => self.on_bucket_digests(now, digests),
        }
        // A sender that has seen loss follows its push with a tail itself.
        let sender_tails = header.flags & (wire::FLAG_LOSS_SEEN | wire::FLAG_TAIL_FOLLOWS) != 0;
        // A push whose digest matches ours after merging shows the gap lost
        // nothing we lack; one that differs has been dealt with as a
        // summary.
        if missed_some && push && !sender_tails && !summarised {
            self.probe_after_gap(now);
        }
    }

    /// We missed a datagram from a peer. If it held data, a summary from us
    /// soon shows the difference and starts the repair, instead of waiting
    /// for the next Trickle summary (up to Imax away). One probe, at most
    /// one per `gap_probe_interval_ms`: on a lossy LAN probes are lost too,
    /// and each loss noticed must not set off a chain of probes.
    fn probe_after_gap(&mut self, now: u64) {
        let probed_lately = self
            .last_gap_probe
            .is_some_and(|at| now.saturating_sub(at) < self.config.gap_probe_interval_ms);
        let exchanging = self.bucket_digests_due.is_some() || !self.repair_queue.is_empty();
        if self.tail.is_none() && !probed_lately && !exchanging {
            self.last_gap_probe = Some(now);
            self.start_tail(now, 1);
        }
    }

    /// Decodes (and with a key, authenticates and decrypts) a datagram,
    /// parsing its header once.
    fn open(&self, bytes: &[u8]) -> Result<(Header, Message), DropReason> {
        let packet = Packet::new_checked(bytes).map_err(DropReason::Decode)?;
        let own_boot = packet.boot() == self.boot || Some(packet.boot()) == self.previous_boot;
        if packet.sender() == self.node_id && own_boot {
            return Err(DropReason::Own);
        }
        let message = match &self.keyring {
            None if packet.is_encrypted() => return Err(DropReason::Decode(DecodeError::BadKey)),
            None => Message::parse_payload(packet.message_type(), packet.body()),
            Some(_) if !packet.is_encrypted() => {
                return Err(DropReason::Decode(DecodeError::Unencrypted));
            }
            Some(keyring) => {
                let payload = keyring.open(&packet).map_err(DropReason::Crypto)?;
                Message::parse_payload(packet.message_type(), &payload)
            }
        };
        Ok((packet.header(), message.map_err(DropReason::Decode)?))
    }

    fn count_drop(&mut self, reason: DropReason) {
        *self.counters.dropped.entry(reason).or_default() += 1;
    }

    /// Our node id with another boot id: a clone, or a replay of one of our
    /// earlier boots. Only a summary sent after we started (by its clock,
    /// which summaries stamp with the sender's current time) and within the
    /// clock bound counts as a clone; then the id changes, at most once per
    /// `node_id_change_interval_ms`.
    fn on_own_id(&mut self, now: u64, message: &Message) {
        let Message::Summary(summary) = message else {
            return self.count_drop(DropReason::OwnIdNotFresh);
        };
        if summary.clock > self.remote_limit() {
            return self.count_drop(DropReason::ClockAhead);
        }
        let started = self.started_physical_ms.unwrap_or(0);
        if summary.clock.physical_ms() < started {
            return self.count_drop(DropReason::OwnIdNotFresh);
        }
        let interval = self.config.node_id_change_interval_ms;
        if self
            .last_node_id_change
            .is_some_and(|at| now.saturating_sub(at) < interval)
        {
            return self.count_drop(DropReason::NodeIdChangePaced);
        }
        self.last_node_id_change = Some(now);
        self.resolve_node_id_clash();
    }

    /// Cloned router images share a persisted node id. Both gateways notice
    /// (each hears its id with another boot id) and both move to a new one;
    /// entries already written keep their versions, which stay valid.
    fn resolve_node_id_clash(&mut self) {
        let old = self.node_id;
        let new = NodeId(self.rng.random());
        log::warn!("node id {old} is also used by another gateway; now using {new}");
        self.node_id = new;
        self.counters.node_id_clashes += 1;
        self.state_generation += 1;
        self.events.push_back(Event::NodeIdClash { old, new });
    }

    /// Records an authenticated datagram from a peer, or says why it must
    /// be dropped: a replay or a flood changes nothing, not even the
    /// quiet-period timer.
    /// Returns whether a datagram from this peer was missed before this one.
    fn hear_peer(&mut self, now: u64, header: &Header) -> Result<bool, DropReason> {
        let rate_max = self.config.sender_datagrams_per_sec_max.max(1);
        let keyed = self.keyring.is_some();
        let mut missed_some = false;
        let mut sample = None;
        match self.peers.get_mut(&header.sender) {
            Some(peer) => {
                let mut window = peer.window;
                let highest_was_first = window.highest_is_first();
                match window.check(header.boot, header.seq) {
                    // Unauthenticated, a retired boot proves nothing: a
                    // forger may have announced the boot that retired it.
                    Err(ReplayError::RetiredBoot) if !keyed => {
                        window.switch_boot(header.boot, header.seq);
                    }
                    Err(error) => return Err(DropReason::Replay(error)),
                    Ok(accepted) => {
                        missed_some = matches!(accepted, Accepted::Skipped { .. });
                        sample = Some((accepted, highest_was_first));
                    }
                }
                if !peer.take_token(now, rate_max) {
                    return Err(DropReason::RateLimited);
                }
                peer.window = window;
                peer.last_heard = now;
            }
            None => {
                if self.peers.len() >= self.config.peers_max {
                    let oldest = self
                        .peers
                        .iter()
                        .min_by_key(|(_, peer)| peer.last_heard)
                        .map(|(id, _)| *id)
                        .expect("peers_max is at least 1 when full");
                    self.peers.remove(&oldest);
                    self.count_drop(DropReason::PeerEvicted);
                }
                if self.config.peers_max > 0 {
                    self.peers
                        .insert(header.sender, Peer::new(now, header, rate_max));
                }
                self.events.push_back(Event::PeerDiscovered(header.sender));
            }
        }
        if let Some((accepted, highest_was_first)) = sample {
            self.count_loss_sample(accepted, highest_was_first);
        }
        if missed_some {
            self.loss_seen_at = Some(now);
        }
        self.last_heard_other = now;
        Ok(missed_some)
    }

    /// Counts what a datagram tells of the loss rate. A sender's datagrams
    /// count as heard only between the first and the highest heard: the
    /// first was heard by choice (those before it are unknown) and so is the
    /// highest (those after it are unknown yet), and counting either makes
    /// the loss look lower where each peer is heard a few times, as in a
    /// large group that Trickle keeps quiet (10 % loss read as 6 % at
    /// N = 128). So the highest is counted once a later one arrives.
    fn count_loss_sample(&mut self, accepted: Accepted, highest_was_first: bool) {
        let heard = match accepted {
            // A long gap is an outage or a restart we did not see, not the
            // loss rate; a forger's jump counts no more either.
            Accepted::Skipped { missed } => {
                self.datagrams_missed += missed.min(LOSS_GAP_COUNTED_MAX);
                !highest_was_first
            }
            Accepted::Next => !highest_was_first,
            // A gap counted as missed is filled after all.
            Accepted::Reordered => {
                self.datagrams_missed = self.datagrams_missed.saturating_sub(1);
                true
            }
            Accepted::NewBoot => false,
        };
        self.datagrams_heard += u32::from(heard);
        if self.datagrams_heard + self.datagrams_missed >= LOSS_SAMPLE {
            self.datagrams_heard /= 2;
            self.datagrams_missed /= 2;
        }
    }

    /// A peer's digest, from its summary or its push (then compared with
    /// ours after the push was merged).
    fn on_summary(&mut self, now: u64, sender: NodeId, heard: Heard) {
        let differs = heard.digest != self.store.digest();
        let sender_difference_before = self.peers.get_mut(&sender).and_then(|peer| {
            let before = peer.last_digest.zip(peer.last_difference_at);
            peer.last_digest = Some(heard.digest);
            peer.last_difference_at = differs.then_some(now);
            before
        });
        // Newer than anything we had seen: the sender holds something we
        // lack (a lost push, most likely), so our digests ask for it;
        // unless it announces what we held before, and lacks what we got.
        let peer_behind_us = self.past_digests.contains(&heard.digest);
        let behind = heard.clock > heard.seen_before && !peer_behind_us;
        self.clock.observe(heard.clock);
        if !differs {
            self.differences_heard.clear();
            // We hold what a peer holds: a request of ours asked for that
            // (with writes flowing, its digest of then is never ours again,
            // and it would be asked every `repair_wait_ms` to the end).
            if self
                .bucket_digests_due
                .is_some_and(|digests| digests.request)
            {
                self.bucket_digests_due = None;
            }
            // A push is not a summary for Trickle or a tail: every summary
            // it suppressed would be one chance fewer for a gateway that
            // lost the push to learn of it.
            if !heard.on_push {
                self.trickle.hear_consistent();
                if let Some(tail) = self.tail.as_mut() {
                    tail.consistent_heard = true;
                }
            }
            return;
        }
        // A push's digest also differs when another gateway wrote at the
        // same time: loss is what the exchange that follows shows, if any.
        if !heard.on_push {
            self.loss_seen_at = Some(now);
        }
        // Method steps 3 and 4 at bucket level: answer with our bucket
        // digests; whichever side holds newer buckets then sends them.
        //
        // The fast path: the sender's summary is newer than anything we
        // have seen and we just missed datagrams of its (a lost push and
        // its repeats): our digests, if they fit one datagram, ask for the
        // repair at once.
        if behind && heard.missed_some && self.repair_queue.is_empty() && self.digests_fit_one() {
            self.differences_heard.clear();
            self.schedule_bucket_digests(now, heard.digest, true);
            return;
        }
        // Otherwise digests (up to 5 kB) answer a difference only when it
        // is heard again after our own summary (sent soon) went out: a real
        // peer that differs keeps saying so, one round later, while a
        // single forged summary draws a summary, not 100x its size in
        // digests. Again means the same digest (from any peer holding that
        // data): a difference mended by pushes since, with no equal summary
        // heard, must not make the next summary of anyone (a forger's, say)
        // count as heard again. A joiner's digest moves on with every
        // repair, so its own requests, not others' answers, drive its
        // join. One summary, not a Trickle reset (RFC 6206 rule 6): a
        // reset would make every gateway that heard the difference send
        // summaries through ten doublings back to Imax.
        let digest = self.store.digest();
        let heard_at = self
            .differences_heard
            .iter()
            .find(|&&(theirs, _)| theirs == heard.digest)
            .map(|&(_, at)| at);
        let confirmed_again = match (heard_at, self.announced) {
            (Some(heard), Some((announced_digest, at))) => at > heard && announced_digest == digest,
            _ => false,
        };
        // With writes flowing the writer's digest, and ours, move on with
        // every push and no digest is heard again: a sender that differed
        // before our summary and still differs after it, holding then what
        // we have not held since, shows a difference that outlived a round.
        // (A write of another gateway in flight made the digest of then one
        // we held once its write arrived.)
        let confirmed_by_sender = !peer_behind_us
            && sender_difference_before.is_some_and(|(digest, heard_at)| {
                !self.past_digests.contains(&digest)
                    && self.announced.is_some_and(|(_, at)| at > heard_at)
            });
        let confirmed = confirmed_again || confirmed_by_sender;
        if !confirmed {
            if heard_at.is_none() {
                if self.differences_heard.len() == DIFFERENCES_HELD {
                    self.differences_heard.pop_front();
                }
                self.differences_heard.push_back((heard.digest, now));
            }
        } else if self.repair_queue.is_empty() {
            self.differences_heard.clear();
            self.schedule_bucket_digests(now, heard.digest, behind);
        }
        if peer_behind_us {
            self.announce_to_peer_behind(now);
        } else if !self
            .bucket_digests_due
            .is_some_and(|digests| digests.request)
        {
            // While a request of ours is out, a summary of ours would only
            // make every gateway ahead of us answer it.
            self.announce_soon(now);
        }
    }

    fn remember_digest(&mut self) {
        let digest = self.store.digest();
        if self.past_digests.back() != Some(&digest) {
            if self.past_digests.len() == PAST_DIGESTS_KEPT {
                self.past_digests.pop_front();
            }
            self.past_digests.push_back(digest);
        }
    }

    fn schedule_bucket_digests(&mut self, now: u64, against: u64, request: bool) {
        match self.bucket_digests_due.as_mut() {
            Some(digests) => {
                if request && !digests.request {
                    digests.request = true;
                    digests.against = against;
                }
                if request {
                    // A new difference while our last ask waits out the
                    // answers' pacing: ask about it soon, and still keep
                    // that last ask.
                    digests.due = digests.due.min(now + self.config.repair_wait_ms);
                    digests.requests_left = digests.requests_left.max(2);
                }
            }
            None => {
                // A request waits half as long as an answer: it is what the
                // answers wait for.
                let delay = if request {
                    self.random_delay() / 2
                } else {
                    self.random_delay()
                };
                self.bucket_digests_due = Some(DigestsDue {
                    due: now + delay,
                    against,
                    request,
                    requests_left: self.config.repair_requests_max.max(1),
                });
            }
        }
    }

    /// Our summary goes out soon (unless an equal one is heard first).
    fn announce_soon(&mut self, now: u64) {
        if self.tail.is_none() {
            self.start_tail(now, 1);
        }
    }

    /// A peer behind us (it announced what we held a few changes ago)
    /// learns from one summary of ours that it lacks something. Every
    /// gateway holding the same heard it too, and a hundred summaries would
    /// go out in the same millisecond: the writer of our newest entry
    /// answers first, the others only later, each unless an equal summary
    /// was heard by then (the writer may be gone or have lost the peer's).
    fn announce_to_peer_behind(&mut self, now: u64) {
        if self.tail.is_some() {
            return;
        }
        let newest_is_ours = self
            .store
            .newest_version()
            .is_some_and(|version| version.origin == self.node_id);
        if newest_is_ours {
            self.start_tail(now, 1);
        } else {
            let imin = self.config.trickle.imin_ms.max(8);
            self.start_tail_within(now, 1, imin / 2, imin / 2);
        }
    }

    /// Whether our bucket digests fit in one datagram.
    fn digests_fit_one(&self) -> bool {
        let per_datagram = (self.payload_bytes_max() - BUCKET_DIGESTS_PREFIX) / BUCKET_DIGEST_LEN;
        (0..BUCKETS)
            .filter(|&bucket| self.store.bucket_summary(bucket).count > 0)
            .nth(per_datagram)
            .is_none()
    }

    /// A repair request like ours is out (or a repair is arriving): ours
    /// waits, and goes only if we still differ by then.
    fn postpone_repair_request(&mut self, now: u64) {
        if let Some(digests) = self.bucket_digests_due.as_mut().filter(|d| d.request) {
            digests.due = digests.due.max(now + self.config.repair_wait_ms);
        }
    }

    fn random_delay(&mut self) -> u64 {
        self.rng
            .random_range(0..self.config.response_window_ms.max(1))
    }

    fn merge_entry(&mut self, key: String, version: Version, value: Option<Box<[u8]>>) -> Merged {
        // A refused entry must not drag our clock anywhere.
        if let Err(rejected) = self.store.check(&key, value.as_deref()) {
            self.count_drop(DropReason::OverLimit);
            return Merged::Rejected(rejected);
        }
        if version.hlc > self.remote_limit() {
            self.count_drop(DropReason::VersionAhead);
            return Merged::Stale;
        }
        self.clock.observe(version.hlc);
        let entry = Entry {
            version,
            value: value.clone(),
        };
        let physical = Hlc::new(self.physical_ms(self.now), 0);
        let merged = self.store.merge(&key, entry, physical);
        match merged {
            Merged::Applied => {
                self.counters.entries_applied += 1;
                self.state_generation += 1;
                self.events.push_back(Event::Changed {
                    key,
                    value,
                    origin: version.origin,
                });
            }
            Merged::Stale => self.counters.entries_stale += 1,
            Merged::Rejected(_) => self.count_drop(DropReason::OverLimit),
        }
        merged
    }

    fn on_entries(&mut self, now: u64, sender: NodeId, entries: Entries) {
        let mut sender_is_behind = false;
        for entry in entries.entries {
            let stored_newer = self
                .store
                .get(&entry.key)
                .is_some_and(|stored| stored.version > entry.version);
            self.merge_entry(entry.key, entry.version, entry.value.map(Into::into));
            sender_is_behind |= stored_newer;
        }
        if let Some(tag) = entries.repair {
            self.hear_repair(now, sender, tag);
        }
        if sender_is_behind {
            // Method step 4: we hold newer data than what we heard, so we
            // start our own sync request.
            self.trickle.reset(now, &mut self.rng);
        }
    }

    /// Another gateway is answering a repair request. If it sent a bucket
    /// of our queue holding what we hold, it answers for us too: we drop
    /// our whole queue
    /// (the requester asks again for anything still missing) unless ours
    /// started first; of two that started, the lower node id goes on.
    /// Otherwise let it go on alone for a while.
    fn hear_repair(&mut self, now: u64, sender: NodeId, tag: RepairTag) {
        self.postpone_repair_request(now);
        let bucket = tag.bucket as usize % BUCKETS;
        let same_data = self.store.bucket_summary(bucket).digest == tag.digest;
        if same_data {
            self.bucket_repair_heard_at[bucket] = Some(now);
        }
        if same_data && self.repair_queue.remove(&tag.bucket).is_some() {
            // It serves what we would: the same request, most likely.
            if !self.repairing || sender < self.node_id {
                self.repair_queue.clear();
            }
        }
        if self.repair_queue.is_empty() {
            self.repair_due = None;
            self.repairing = false;
        } else if let Some(due) = self.repair_due {
            let defer = now + self.config.response_window_ms + self.random_delay();
            self.repair_due = Some(due.max(defer));
        }
    }

    fn on_fragment(&mut self, now: u64, sender: NodeId, fragment: Fragment) {
        if fragment.version.hlc > self.remote_limit() {
            return self.count_drop(DropReason::VersionAhead);
        }
        if self
            .store
            .get(&fragment.key)
            .is_some_and(|stored| stored.version >= fragment.version)
        {
            self.counters.entries_stale += 1;
            return;
        }
        let key = fragment.key.clone();
        let version = fragment.version;
        let value_bytes_max = self.config.store.value_bytes_max;
        let inserted = self
            .reassembly
            .insert(now, sender, fragment, value_bytes_max);
        self.counters.reassembly_evictions = self.reassembly.evictions();
        match inserted {
            Ok(Some(value)) => {
                self.merge_entry(key, version, Some(value.into()));
            }
            Ok(None) => {}
            Err(_) => self.count_drop(DropReason::ReassemblyFull),
        }
    }

    fn on_bucket_digests(&mut self, now: u64, digests: BucketDigests) {
        let limit = self.remote_limit();
        if digests
            .buckets
            .iter()
            .any(|(_, summary)| summary.max_hlc > limit)
        {
            return self.count_drop(DropReason::ClockAhead);
        }
        if digests.digest == self.store.digest() {
            // An answer identical to ours is already out. A request of ours
            // only waits: the one heard may go unanswered for us.
            if self.bucket_digests_due.is_some_and(|d| d.request) {
                self.postpone_repair_request(now);
            } else {
                self.bucket_digests_due = None;
            }
            return;
        }
        self.loss_seen_at = Some(now);
        let mut listed = digests.buckets.iter().peekable();
        let mut we_need = false;
        // Buckets we hold newer, with the requester's digest of each.
        let mut ours_newer: Vec<(u16, u64)> = Vec::new();
        for bucket in digests.first..digests.end.min(BUCKETS as u16) {
            let theirs = match listed.peek() {
                Some(&&(index, summary)) if index == bucket => {
                    listed.next();
                    summary
                }
                _ => BucketSummary::default(),
            };
            let ours = self.store.bucket_summary(bucket as usize);
            if ours.digest == theirs.digest {
                continue;
            }
            // The method's rule per bucket: the side with the newer data
            // sends. When neither is newer both hold something the other
            // lacks, and both send.
            let ours_rank = (ours.max_hlc, ours.count.min(u16::MAX as u32));
            let theirs_rank = (theirs.max_hlc, theirs.count);
            if ours_rank >= theirs_rank {
                ours_newer.push((bucket, theirs.digest));
            }
            if ours_rank <= theirs_rank {
                we_need = true;
            }
        }
        let asked = ours_newer.len();
        self.drop_served_lately(now, &mut ours_newer);
        self.counters.repairs_paced += (asked - ours_newer.len()) as u64;
        // One answer, not one per gateway: the origin of the newest entry
        // among what we would send (the writer of a lost push; whoever
        // wrote last, for a join) answers within the first quarter of the
        // window. About `repair_volunteers` others, drawn per request, stand
        // by for the rest of it in case the origin is gone or missed the
        // request; the rest stay quiet, and a request that goes unanswered
        // is asked again.
        let newest_is_ours = ours_newer
            .iter()
            .flat_map(|&(bucket, _)| self.store.bucket_entries(bucket as usize))
            .map(|(_, entry)| entry.version)
            .max()
            .is_some_and(|version| version.origin == self.node_id);
        let volunteers = self.config.repair_volunteers as u64;
        let others = self.peers.len().max(1) as u64;
        let volunteer = !ours_newer.is_empty() && self.rng.random_range(0..others) < volunteers;
        let mut newly_queued = false;
        if newest_is_ours || volunteer {
            for (bucket, theirs) in ours_newer {
                match self.repair_queue.entry(bucket) {
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert(Some(theirs));
                        newly_queued = true;
                    }
                    std::collections::btree_map::Entry::Occupied(mut slot) => {
                        if *slot.get() != Some(theirs) {
                            slot.insert(None);
                        }
                    }
                }
            }
        }
        if newly_queued && self.repair_due.is_none() {
            let window = self.config.response_window_ms.max(4);
            let delay = if newest_is_ours {
                self.rng.random_range(0..window / 4)
            } else {
                window / 4 + self.rng.random_range(0..window - window / 4)
            };
            self.repair_due = Some(now + delay);
        }
        if we_need {
            self.schedule_bucket_digests(now, digests.digest, true);
        }
    }

    /// Drops from `ours_newer` (buckets with the requester's digest of
    /// each) those a repair within `repair_bucket_interval_ms` serves
    /// already:
    ///
    /// - a bucket we sent to a requester holding the same digest of it:
    ///   that answer serves this request too, however many arrive, and a
    ///   requester that got part of it asks with another digest and is sent
    ///   the rest;
    /// - for a join-sized request, also a bucket another gateway was heard
    ///   sending while we held the same: the requests of many joiners, or
    ///   one forger's with fresh sequence numbers, then draw the store once
    ///   per window from the whole group, not once per gateway that
    ///   volunteers. A joiner that lost part of the answer usually lacks
    ///   less than a join-sized share and is sent the rest at once; one
    ///   that lost more is sent it when it asks after the window.
    fn drop_served_lately(&self, now: u64, ours_newer: &mut Vec<(u16, u64)>) {
        let interval = self.config.repair_bucket_interval_ms;
        let lately = |at: u64| now.saturating_sub(at) < interval;
        let join_sized = ours_newer.len() >= JOIN_BUCKETS_MIN;
        ours_newer.retain(|&(bucket, theirs)| {
            let bucket = bucket as usize;
            let ours = self.bucket_repaired_at[bucket]
                .is_some_and(|(at, digest)| lately(at) && digest == theirs);
            let heard = join_sized && self.bucket_repair_heard_at[bucket].is_some_and(lately);
            !(ours || heard)
        });
    }

    fn payload_bytes_max(&self) -> usize {
        self.config
            .datagram_bytes_max
            .saturating_sub(HEADER_LEN + self.config.seal_overhead_bytes)
            .max(FRAGMENT_OVERHEAD + self.config.store.key_bytes_max + 1)
    }

    fn header_flags(&self, push: bool) -> u8 {
        let mut flags = 0;
        if self.recent(self.loss_seen_at) {
            flags |= wire::FLAG_LOSS_SEEN;
        }
        if push && self.tail.is_some() {
            flags |= wire::FLAG_TAIL_FOLLOWS;
        }
        flags
    }

    fn send(&mut self, message: &Message) {
        let mut datagram = self.datagram_buffer(256);
        message.emit_payload(&mut datagram);
        let kind = match message {
            Message::Summary(_) => Sent::Summary,
            Message::Entries(entries) if entries.repair.is_some() => Sent::Repair,
            Message::Entries(_) => Sent::Push,
            Message::Fragment(_) => Sent::Fragment,
            Message::BucketDigests(_) => Sent::BucketDigests,
        };
        self.send_datagram(message.message_type(), kind, datagram);
    }

    /// Sends an Entries datagram of `count` entries already written (by
    /// [`pack_entries`]) into `body`.
    fn send_entries_body(
        &mut self,
        repair: Option<RepairTag>,
        digest: Option<u64>,
        count: u16,
        body: &[u8],
    ) {
        let mut datagram = self.datagram_buffer(ENTRIES_PREFIX_MAX + body.len());
        wire::emit_entries_prefix(repair, digest, count, &mut datagram);
        datagram.extend_from_slice(body);
        let kind = if repair.is_some() {
            Sent::Repair
        } else {
            Sent::Push
        };
        self.send_datagram(MessageType::Entries, kind, datagram);
    }

    /// A datagram's buffer with room in front for the header (and, keyed,
    /// the nonce), so the payload written after it goes out without
    /// another copy.
    fn datagram_buffer(&self, payload_bytes: usize) -> Vec<u8> {
        let room = if self.keyring.is_some() {
            SEALED_PAYLOAD_OFFSET
        } else {
            HEADER_LEN
        };
        let mut datagram = Vec::with_capacity(room + payload_bytes + TAG_LEN);
        datagram.resize(room, 0);
        datagram
    }

    /// Puts the header in front of a payload written after
    /// [`Engine::datagram_buffer`]'s room, seals it when keyed, and queues
    /// it.
    fn send_datagram(&mut self, message_type: MessageType, kind: Sent, mut datagram: Vec<u8>) {
        if self.seq == u32::MAX {
            // A sequence never wraps within a boot, or replay windows would
            // refuse what follows: take a new boot id instead.
            self.previous_boot = Some(self.boot);
            self.boot = self.rng.random();
            self.seq = 0;
        }
        self.seq += 1;
        let mut header = Header {
            message_type,
            flags: self.header_flags(matches!(kind, Sent::Push | Sent::Fragment)),
            key_id: 0,
            sender: self.node_id,
            boot: self.boot,
            seq: self.seq,
        };
        match &self.keyring {
            None => datagram[..HEADER_LEN].copy_from_slice(&header.to_bytes()),
            Some(keyring) => {
                header.flags |= wire::FLAG_ENCRYPTED;
                header.key_id = keyring.primary_id();
                keyring.seal_in_place(&header.to_bytes(), &mut datagram, &mut self.nonce_rng);
            }
        }
        self.counters.datagrams_sent += 1;
        self.counters.bytes_sent += datagram.len() as u64;
        let counter = match kind {
            Sent::Summary => &mut self.counters.summaries_sent,
            Sent::Repair => &mut self.counters.repairs_sent,
            Sent::Push => &mut self.counters.pushes_sent,
            Sent::Fragment => &mut self.counters.fragments_sent,
            Sent::BucketDigests => &mut self.counters.bucket_digests_sent,
        };
        *counter += 1;
        self.transmits.push_back(datagram);
    }

    fn send_summary(&mut self) {
        // The clock field tells the sender's current time (not only its
        // last event), so a clone's summary is told from a replay of ours.
        // Capped at the bound, so a gateway whose clock was set back after
        // running ahead is not refused by everyone until time catches up.
        let physical_ms = self.physical_ms(self.now);
        let high_water = self
            .clock
            .high_water()
            .min(remote_limit(physical_ms, self.config.clock_ahead_max_ms));
        let summary = Summary {
            digest: self.store.digest(),
            entries: self.store.len() as u32,
            clock: high_water.max(Hlc::new(physical_ms, 0)),
        };
        self.announced = Some((summary.digest, self.now));
        self.send(&Message::Summary(summary));
    }

    fn recent(&self, at: Option<u64>) -> bool {
        at.is_some_and(|at| self.now.saturating_sub(at) < self.config.loss_memory_ms)
    }

    fn flush_push(&mut self, now: u64) {
        self.last_push_at = Some(now);
        let keys: Vec<String> = std::mem::take(&mut self.pending_push).into_iter().collect();
        // Scheduled first, so the push tells its receivers that a tail
        // follows (loss heard second-hand is not in our loss flag).
        let lossy = self.recent(self.loss_seen_at) || self.recent(self.loss_heard_at);
        if lossy {
            self.start_tail(now, self.config.tail_summaries);
        }
        let sent = self.send_pushed(&keys);
        if lossy {
            let (copies, summary_follows) = self.lossy_push_copies();
            if let Some(tail) = self.tail.as_mut().filter(|_| sent == 1 && copies > 1) {
                tail.repeat = keys;
                tail.repeats_left = copies - 1;
                // Each copy is a delivery, not a question that waits for
                // answers, and a late copy is the p99 of the group: evenly
                // spaced from the push, Imin/8 apart (ten within 125 ms by
                // default). Closer copies are lost together in a burst of
                // loss more often: Imin/16 halved the p99 under independent
                // loss and took it to seconds under bursts of 2 ms at N =
                // 128 and of 5 ms at every N (bench/README.md).
                tail.gap_ms = self.config.trickle.imin_ms.max(8) / 8;
                tail.due = now + tail.gap_ms;
                if !summary_follows {
                    tail.remaining = 0;
                }
            }
        }
    }

    /// How many times a one-datagram push goes out on a lossy LAN, and
    /// whether a summary follows the copies (so that a gateway that lost
    /// the push but hears the summary asks at once).
    ///
    /// As many copies as leave at most one update in
    /// [`Config::push_left_out_inverse`] with a gateway that lost them all: it
    /// then waits for a Trickle summary, seconds in an idle group, which
    /// is the whole p99 of a lossy group. Repeating a one-datagram push is
    /// the best erasure code there is: a repair round (request and answer,
    /// each lost too) costs more than the copies it spares. The loss rate
    /// is the one measured lately, leaning on a heavy prior until enough
    /// was heard. The group's size enters, and only the peers heard are
    /// known: Trickle keeps most gateways of a large group quiet, so from
    /// `tail_repeat_peers_min` peers on at least eight times as many are
    /// assumed.
    fn lossy_push_copies(&self) -> (u32, bool) {
        let peers = self.peers.len();
        let large_min = self.config.tail_repeat_peers_min.max(1);
        let assumed_peers = if peers >= large_min {
            peers.max(8 * large_min)
        } else {
            peers
        };
        let loss = (f64::from(self.datagrams_missed) + LOSS_PRIOR_MISSED)
            / (f64::from(self.datagrams_heard + self.datagrams_missed) + LOSS_PRIOR_SAMPLED);
        let mut left_out = assumed_peers as f64 * loss;
        let left_out_inverse = f64::from(self.config.push_left_out_inverse);
        let mut copies = 1;
        while copies < PUSH_COPIES_MAX && left_out * left_out_inverse > 1.0 {
            left_out *= loss;
            copies += 1;
        }
        (copies, copies == 1)
    }

    /// Pushes the current entries of `keys`; returns the datagrams sent.
    /// The entries are written into the datagrams straight from the store.
    fn send_pushed(&mut self, keys: &[String]) -> usize {
        let store = &self.store;
        let packed = pack_entries(
            self.entries_room(),
            keys.iter()
                .filter_map(|key| store.get(key).map(|entry| (key.as_str(), entry))),
        );
        self.send_packed(None, packed)
    }

    /// Schedules `count` tail summaries: the first in `[Imin/8, Imin/4)`
    /// (long after the push itself has crossed a LAN, soon enough that a
    /// repair fits in well under 100 ms), the next ones after doubling gaps
    /// from `Imin/4`.
    fn start_tail(&mut self, now: u64, count: u32) {
        let imin = self.config.trickle.imin_ms.max(8);
        self.start_tail_within(now, count, imin / 8, imin / 8);
    }

    /// A tail whose first summary goes out in `[earliest, earliest + spread)`.
    fn start_tail_within(&mut self, now: u64, count: u32, earliest: u64, spread: u64) {
        if count == 0 {
            return;
        }
        let imin = self.config.trickle.imin_ms.max(8);
        self.tail = Some(Tail {
            due: now + earliest + self.rng.random_range(0..spread.max(1)),
            gap_ms: imin / 4,
            remaining: count,
            consistent_heard: false,
            repeat: Vec::new(),
            repeats_left: 0,
        });
    }

    /// Bytes of entries one Entries datagram holds.
    fn entries_room(&self) -> usize {
        self.payload_bytes_max() - ENTRIES_PREFIX_MAX
    }

    /// Packs entries into as few datagrams as fit; values too large for one
    /// datagram go out as fragments. Returns the number of datagrams.
    fn send_entries<'a>(
        &mut self,
        repair: Option<RepairTag>,
        entries: impl Iterator<Item = (&'a str, EntryRef<'a>)>,
    ) -> usize {
        let packed = pack_entries(self.entries_room(), entries);
        self.send_packed(repair, packed)
    }

    fn send_packed(&mut self, repair: Option<RepairTag>, packed: PackedEntries) -> usize {
        let mut sent = 0;
        for (key, entry) in &packed.oversized {
            sent += self.send_fragments(key, entry);
        }
        let batches = packed.batches.len();
        for (index, (count, body)) in packed.batches.iter().enumerate() {
            // The last datagram of a push tells our digest: it is our
            // summary too.
            let digest = (repair.is_none() && index + 1 == batches).then(|| self.store.digest());
            if let Some(digest) = digest {
                self.announced = Some((digest, self.now));
            }
            self.send_entries_body(repair, digest, *count, body);
            sent += 1;
        }
        if sent == 0 && repair.is_some() {
            // An empty bucket is told by an empty repair.
            self.send_entries_body(repair, None, 0, &[]);
            sent += 1;
        }
        sent
    }

    /// How [`Engine::send_entries`] splits entries into datagrams: each
    /// unit is one datagram, or one entry sent as fragments.
    fn pack(&self, entries: &[(String, Entry)]) -> Vec<Vec<usize>> {
        let room = self.entries_room();
        let mut units = Vec::new();
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for (at, (key, entry)) in entries.iter().enumerate() {
            let len = WireEntry::encoded_len(key, entry.value.as_deref());
            if len > room {
                units.push(vec![at]);
                continue;
            }
            if batch_bytes + len > room {
                units.push(std::mem::take(&mut batch));
                batch_bytes = 0;
            }
            batch_bytes += len;
            batch.push(at);
        }
        if !batch.is_empty() {
            units.push(batch);
        }
        units
    }

    fn send_fragments(&mut self, key: &str, entry: &Entry) -> usize {
        let value = entry.value.as_deref().unwrap_or_default();
        let chunk_len = self.payload_bytes_max() - FRAGMENT_OVERHEAD - key.len();
        let mut sent = 0;
        for (index, chunk) in value.chunks(chunk_len).enumerate() {
            self.send(&Message::Fragment(Fragment {
                key: key.to_owned(),
                version: entry.version,
                total_len: value.len() as u32,
                offset: (index * chunk_len) as u32,
                chunk: chunk.to_vec(),
            }));
            sent += 1;
        }
        sent
    }

    /// Sends the digests of every non-empty bucket, in as many datagrams as
    /// needed, each covering a contiguous range so that an empty bucket is
    /// told by its absence.
    fn send_bucket_digests(&mut self) {
        let per_datagram = (self.payload_bytes_max() - BUCKET_DIGESTS_PREFIX) / BUCKET_DIGEST_LEN;
        let digest = self.store.digest();
        let mut first = 0u16;
        let mut buckets = Vec::new();
        for bucket in 0..BUCKETS as u16 {
            let summary = self.store.bucket_summary(bucket as usize);
            if summary.count == 0 {
                continue;
            }
            if buckets.len() == per_datagram {
                self.send(&Message::BucketDigests(BucketDigests {
                    digest,
                    first,
                    end: bucket,
                    buckets: std::mem::take(&mut buckets),
                }));
                first = bucket;
            }
            buckets.push((bucket, summary));
        }
        self.send(&Message::BucketDigests(BucketDigests {
            digest,
            first,
            end: BUCKETS as u16,
            buckets,
        }));
    }

    /// Refills the repair byte budget; returns when it will be positive.
    fn repair_budget_ready_at(&mut self, now: u64) -> u64 {
        let rate = self.config.repair_bytes_per_sec_max.max(1) as i64;
        let elapsed = now.saturating_sub(self.repair_budget_at) as i64;
        let refill = elapsed.saturating_mul(rate) / 1000;
        if refill > 0 {
            self.repair_budget_bytes = self.repair_budget_bytes.saturating_add(refill).min(rate);
            self.repair_budget_at = now;
        }
        if self.repair_budget_bytes > 0 {
            now
        } else {
            now + ((1 - self.repair_budget_bytes) * 1000 / rate) as u64 + 1
        }
    }

    fn repair_next(&mut self, now: u64) {
        let ready_at = self.repair_budget_ready_at(now);
        if ready_at > now {
            self.counters.repair_budget_waits += 1;
            self.repair_due = Some(ready_at);
            return;
        }
        let Some((bucket, theirs)) = self.repair_queue.pop_first() else {
            self.repairing = false;
            return;
        };
        self.repairing = !self.repair_queue.is_empty();
        self.bucket_repaired_at[bucket as usize] = Some((now, theirs.unwrap_or_default()));
        let bytes_before = self.counters.bytes_sent;
        let tag = RepairTag {
            bucket,
            digest: self.store.bucket_summary(bucket as usize).digest,
        };
        let entries: Vec<(String, Entry)> = self
            .store
            .bucket_entries(bucket as usize)
            .map(|(key, entry)| (key.to_owned(), entry.to_owned()))
            .collect();
        let units = self.pack(&entries);
        let held = theirs.and_then(|digest| units_held(&entries, &units, digest));
        let mut sent = 0;
        for (index, unit) in units.iter().enumerate() {
            if held.is_some_and(|mask| mask & (1 << index) != 0) {
                continue;
            }
            sent += self.send_entries(
                Some(tag),
                unit.iter()
                    .map(|&at| (entries[at].0.as_str(), entries[at].1.as_ref())),
            );
        }
        if units.is_empty() {
            sent += self.send_entries(Some(tag), std::iter::empty());
        }
        let bytes = self.counters.bytes_sent - bytes_before;
        self.repair_budget_bytes = self.repair_budget_bytes.saturating_sub(bytes as i64);
        if !self.repair_queue.is_empty() {
            self.repair_due = Some(now + self.config.repair_datagram_interval_ms * sent as u64);
        }
    }
}

/// What a datagram was sent as, for its counter and header flags.
#[derive(Clone, Copy)]
enum Sent {
    Summary,
    Push,
    Repair,
    Fragment,
    BucketDigests,
}

/// Entries written into datagram bodies while borrowed (from the store, or
/// a repair's copy of a bucket): no owned copy of each on the way out.
#[derive(Default)]
struct PackedEntries {
    /// Each datagram's entry count and its entries as [`wire::emit_entry`]
    /// wrote them.
    batches: Vec<(u16, Vec<u8>)>,
    /// Entries too large for one datagram: they go out as fragments.
    oversized: Vec<(String, Entry)>,
}

/// Packs entries in order into as few datagrams of `room` bytes as fit,
/// as [`Engine::pack`] plans a repair's units.
fn pack_entries<'a>(
    room: usize,
    entries: impl Iterator<Item = (&'a str, EntryRef<'a>)>,
) -> PackedEntries {
    let mut packed = PackedEntries::default();
    let mut body = Vec::new();
    let mut count = 0u16;
    let mut body_bytes = 0;
    for (key, entry) in entries {
        let len = WireEntry::encoded_len(key, entry.value);
        if len > room {
            packed.oversized.push((key.to_owned(), entry.to_owned()));
            continue;
        }
        if body_bytes + len > room {
            packed.batches.push((count, std::mem::take(&mut body)));
            count = 0;
            body_bytes = 0;
        }
        body_bytes += len;
        body.reserve(len);
        wire::emit_entry(key, entry.version, entry.value, &mut body);
        count += 1;
    }
    if count > 0 {
        packed.batches.push((count, body));
    }
    packed
}

/// Units of a repair (see [`Engine::pack`]) a requester already holds, as
/// a bit mask, found from its digest of the bucket: bucket digests are XORs
/// of entry hashes, and a datagram is lost whole, so a requester that lost
/// some datagrams of an earlier repair holds exactly some of its units.
/// `None` when no set of units matches (it holds other versions) or there
/// are too many units to try.
fn units_held(entries: &[(String, Entry)], units: &[Vec<usize>], theirs: u64) -> Option<u64> {
    const UNITS_TRIED_MAX: usize = 12;
    if units.len() > UNITS_TRIED_MAX {
        return None;
    }
    let unit_digests: Vec<u64> = units
        .iter()
        .map(|unit| {
            unit.iter().fold(0, |digest, &at| {
                let (key, entry) = &entries[at];
                digest ^ store::entry_hash(key, entry.as_ref())
            })
        })
        .collect();
    (0..1u64 << units.len()).find(|mask| {
        let digest = unit_digests
            .iter()
            .enumerate()
            .filter(|(index, _)| mask & (1 << index) != 0)
            .fold(0, |digest, (_, unit)| digest ^ unit);
        digest == theirs
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_datagrams_are_dropped_and_a_clashing_id_is_replaced() {
        let mut a = Engine::new(Config::default(), NodeId(1), 1, 0);
        let mut b = Engine::new(Config::default(), NodeId(1), 2, 0);
        a.set_wall_clock(0, 1_000);
        b.set_wall_clock(0, 1_000);
        a.set(0, 1_000, "k", b"1").unwrap();
        a.handle_timeout(a.poll_timeout());
        let push = a.poll_transmit().expect("push");
        a.handle_datagram(5, &push);
        assert_eq!(a.counters().dropped.get(&DropReason::Own), Some(&1));
        // Our id in a push is no evidence of a clone (it may be a replay).
        b.handle_datagram(5, &push);
        assert_eq!(b.node_id(), NodeId(1));
        assert_eq!(
            b.counters().dropped.get(&DropReason::OwnIdNotFresh),
            Some(&1)
        );
        // A summary sent after b started is.
        a.trigger(10, TriggerReason::Manual);
        a.handle_timeout(a.poll_timeout());
        let summary = std::iter::from_fn(|| a.poll_transmit())
            .last()
            .expect("summary");
        b.handle_datagram(a.poll_timeout(), &summary);
        let clash =
            std::iter::from_fn(|| b.poll_event()).find(|e| matches!(e, Event::NodeIdClash { .. }));
        assert!(matches!(
            clash,
            Some(Event::NodeIdClash { old: NodeId(1), .. })
        ));
        assert_ne!(b.node_id(), NodeId(1));
    }

    const WALL: u64 = 1_780_000_000_000;

    /// Two engines (node ids 1 and 2) whose wall clocks read `WALL` at
    /// monotonic time 0.
    fn two_engines_at_wall() -> (Engine, Engine) {
        let mut a = Engine::new(Config::default(), NodeId(1), 1, 0);
        let mut b = Engine::new(Config::default(), NodeId(2), 2, 0);
        a.set_wall_clock(0, WALL);
        b.set_wall_clock(0, WALL);
        (a, b)
    }

    /// When [`two_settled_engines`] have settled.
    const SETTLED: u64 = 600_000;

    /// [`two_engines_at_wall`], apart until `SETTLED`, by when their
    /// Trickle intervals are long: a summary in a test's short window is
    /// one the test drew.
    fn two_settled_engines() -> (Engine, Engine) {
        let (mut a, mut b) = two_engines_at_wall();
        run_timers(&mut a, 0, SETTLED);
        run_timers(&mut b, 0, SETTLED);
        (a, b)
    }

    #[test]
    fn a_push_that_says_a_tail_follows_draws_no_gap_probe() {
        let (mut a, mut b) = two_settled_engines();
        let start = SETTLED;
        let summary_of = |engine: &mut Engine, now: u64| {
            engine.trigger(now, TriggerReason::Manual);
            run_timers(engine, now, now + 200).remove(0)
        };
        b.handle_datagram(start, &summary_of(&mut a, start));
        let _lost = summary_of(&mut a, start + 1_000);
        // a hears of loss second-hand only: its loss flag stays clear, yet
        // it follows its pushes with a tail.
        a.handle_datagram(
            start + 2_000,
            &summary_datagram(3, 1, wire::FLAG_LOSS_SEEN, &a),
        );
        // A value in fragments: no fragment carries its sender's digest,
        // so the flag is all a receiver has to go by.
        let pushed_at = start + 3_000;
        let value = vec![b'v'; 3_000];
        a.set(pushed_at, WALL + pushed_at, "k", &value).unwrap();
        let push = run_timers(&mut a, pushed_at, pushed_at);
        assert!(push.len() > 1);
        let flags = Packet::new_checked(&push[0]).unwrap().flags();
        assert_eq!(
            (
                flags & wire::FLAG_LOSS_SEEN,
                flags & wire::FLAG_TAIL_FOLLOWS
            ),
            (0, wire::FLAG_TAIL_FOLLOWS)
        );
        // b lost a's previous datagram: the gap would draw a summary of
        // b's within Imin/4, but a's tail covers it.
        let summaries_before = b.counters().summaries_sent;
        for datagram in &push {
            b.handle_datagram(pushed_at + 1, datagram);
        }
        assert_eq!(b.get("k"), Some(&value[..]));
        run_timers(&mut b, pushed_at + 1, pushed_at + 100);
        assert_eq!(b.counters().summaries_sent, summaries_before);
    }

    #[test]
    fn a_gap_before_a_push_whose_digest_matches_ours_draws_no_probe() {
        let (mut a, mut b) = two_settled_engines();
        let start = SETTLED;
        a.trigger(start, TriggerReason::Manual);
        b.handle_datagram(start, &run_timers(&mut a, start, start + 200).remove(0));
        a.trigger(start + 1_000, TriggerReason::Manual);
        let _lost = run_timers(&mut a, start + 1_000, start + 1_200);
        let pushed_at = start + 3_000;
        a.set(pushed_at, WALL + pushed_at, "k", b"1").unwrap();
        let push = run_timers(&mut a, pushed_at, pushed_at).remove(0);
        let (header, message) = wire::decode(&push).unwrap();
        assert_eq!(header.flags, 0, "a clean LAN's push promises no tail");
        let Message::Entries(Entries {
            digest: Some(digest),
            ..
        }) = message
        else {
            panic!("the push carries no digest: {message:?}")
        };
        assert_eq!(digest, a.store().digest());
        // b missed a's previous datagram, but after the push it holds what
        // a holds: nothing is missing, and nothing is asked.
        let sent_before = b.counters().datagrams_sent;
        b.handle_datagram(pushed_at + 1, &push);
        assert_eq!(b.store().digest(), a.store().digest());
        run_timers(&mut b, pushed_at + 1, pushed_at + 1_000);
        assert_eq!(b.counters().datagrams_sent, sent_before);
    }

    fn a_summary(engine: &Engine) -> Summary {
        Summary {
            digest: engine.store().digest(),
            entries: engine.store().len() as u32,
            clock: Hlc::new(WALL, 0),
        }
    }

    /// A summary of `engine`'s data from peer `sender`, with header `flags`.
    fn summary_datagram(sender: u64, seq: u32, flags: u8, engine: &Engine) -> Vec<u8> {
        let message = Message::Summary(a_summary(engine));
        let header = Header {
            flags,
            ..Packet::new_checked(&forged(sender, seq, &message))
                .unwrap()
                .header()
        };
        wire::encode(&header, &message)
    }

    /// When `engine` first sends anything from `from` on (its timers run
    /// until `until`), or `None` if nothing by then.
    fn first_send_after(engine: &mut Engine, from: u64, until: u64) -> Option<u64> {
        run_timers_timed(engine, from, until)
            .first()
            .map(|&(at, _)| at)
    }

    #[test]
    fn a_lone_push_on_a_lossy_lan_goes_out_in_as_many_copies_as_the_loss_and_group_need() {
        // (pushes, summaries) of a lone write, after `peers` more peers
        // were heard, 40 datagrams each, one missed after every
        // `heard_per_miss`; each push says that more follows, the last
        // copy too.
        let sent_after_with = |peers: u64, heard_per_miss: u32, left_out_inverse: u32| {
            let (mut a, _) = two_settled_engines();
            a.config.push_left_out_inverse = left_out_inverse;
            let mut now = SETTLED;
            for peer in 10..10 + peers {
                for n in 0..40 {
                    now += 10;
                    let flags = if n == 0 { wire::FLAG_LOSS_SEEN } else { 0 };
                    let seq = 1 + n + n / heard_per_miss;
                    a.handle_datagram(now, &summary_datagram(peer, seq, flags, &a));
                }
            }
            a.set(now, WALL + now, "k", b"1").unwrap();
            let sent: Vec<(u64, Header)> = run_timers_timed(&mut a, now, now + 1_000)
                .iter()
                .map(|(at, datagram)| (*at, Packet::new_checked(datagram).unwrap().header()))
                .collect();
            let headers: Vec<Header> = sent.iter().map(|(_, header)| *header).collect();
            let pushes: Vec<&Header> = headers
                .iter()
                .filter(|header| header.message_type == wire::MessageType::Entries)
                .collect();
            assert!(
                pushes
                    .iter()
                    .all(|header| header.flags & wire::FLAG_TAIL_FOLLOWS != 0)
            );
            // The push leaves at once, its copies evenly Imin/8 apart.
            let copy_gap = a.config.trickle.imin_ms / 8;
            let push_times = sent
                .iter()
                .filter(|(_, header)| header.message_type == wire::MessageType::Entries)
                .map(|(at, _)| at - now);
            assert!(
                push_times
                    .enumerate()
                    .all(|(copy, after)| after == copy as u64 * copy_gap),
                "copies not evenly spaced from the push: {sent:?}"
            );
            let summaries = headers
                .iter()
                .filter(|header| header.message_type == wire::MessageType::Summary)
                .count();
            (pushes.len(), summaries)
        };
        let default_inverse = Config::default().push_left_out_inverse;
        let sent_after =
            |peers, heard_per_miss| sent_after_with(peers, heard_per_miss, default_inverse);
        // Six peers, no datagram missed: what 32 peers would need with the
        // prior's 0.8 datagrams missed in 238 (32 * 0.0034 = 1 in 9 left
        // without the push, 32 * 0.0034^2 = 1 in 2,700).
        assert_eq!(sent_after(5, u32::MAX), (2, 0), "no datagram missed");
        // Every other datagram missed: 1 in 200 updates leaving one of 32
        // without any would take 13 copies; bounded.
        assert_eq!(
            sent_after(5, 1),
            (PUSH_COPIES_MAX as usize, 0),
            "every other datagram missed"
        );
        // Two peers at 1 in 10 missed: 2 * 0.1^3 = 1 in 500 left without
        // it, 2 * 0.1^2 = 1 in 50 too many.
        assert_eq!(sent_after(1, 9), (3, 0), "two peers, light loss");
        // One update in 20 may leave a gateway out: 2 * 0.1^2 = 1 in 50.
        assert_eq!(
            sent_after_with(1, 9, 20),
            (2, 0),
            "two peers, light loss, fewer copies wanted"
        );
        // A handful of datagrams say little of the rate yet: copies as for
        // the prior's heavy loss, 2 * 0.2^4 = 1 in 312 left without it,
        // 2 * 0.2^3 = 1 in 62 too many.
        let (mut a, _) = two_settled_engines();
        a.datagrams_heard = 0;
        a.datagrams_missed = 0;
        let flagged = summary_datagram(10, 1, wire::FLAG_LOSS_SEEN, &a);
        a.handle_datagram(SETTLED, &flagged);
        a.set(SETTLED, WALL + SETTLED, "k", b"1").unwrap();
        let kinds: Vec<wire::MessageType> = run_timers(&mut a, SETTLED, SETTLED + 1_000)
            .iter()
            .map(|datagram| Packet::new_checked(datagram).unwrap().header().message_type)
            .collect();
        assert_eq!(
            kinds,
            [wire::MessageType::Entries; 4],
            "loss rate not known yet"
        );
    }

    #[test]
    fn the_loss_rate_is_read_right_from_peers_heard_only_a_few_times() {
        // A hundred peers send three datagrams each, and every tenth one's
        // second is lost: one in ten of the datagrams whose fate can be
        // known. The first heard and the last heard were heard by choice;
        // counting them too read this as one in twenty.
        let (mut a, _) = two_settled_engines();
        a.datagrams_heard = 0;
        a.datagrams_missed = 0;
        let mut now = SETTLED;
        for peer in 100..200 {
            for seq in 1..=3 {
                now += 10;
                if seq == 2 && peer % 10 == 0 {
                    continue;
                }
                a.handle_datagram(now, &summary_datagram(peer, seq, 0, &a));
            }
        }
        assert_eq!((a.datagrams_heard, a.datagrams_missed), (90, 10));
    }

    #[test]
    fn a_peer_behind_the_group_is_answered_first_by_the_writer_of_the_newest_entry() {
        let (mut writer, mut other) = two_settled_engines();
        let start = SETTLED;
        let before_the_write = summary_datagram(9, 1, 0, &other);
        writer.set(start, WALL + start, "k", b"1").unwrap();
        for push in run_timers(&mut writer, start, start) {
            other.handle_datagram(start + 1, &push);
        }
        assert_eq!(other.get("k"), Some(&b"1"[..]));
        // A third gateway that lost the write announces what it holds.
        let heard_at = start + 2_000;
        writer.handle_datagram(heard_at, &before_the_write);
        other.handle_datagram(heard_at, &before_the_write);
        let imin = Config::default().trickle.imin_ms;
        let answered_at = first_send_after(&mut writer, heard_at, heard_at + 1_000).unwrap();
        assert!(
            answered_at - heard_at < imin / 4,
            "{} ms",
            answered_at - heard_at
        );
        // The other gateway holding the same stands by, and the writer's
        // summary, heard first, keeps it quiet.
        assert_eq!(
            first_send_after(&mut other, heard_at, heard_at + imin / 2 - 1),
            None
        );
        other.handle_datagram(heard_at + imin / 2 - 1, &summary_datagram(1, 5, 0, &writer));
        assert_eq!(
            first_send_after(&mut other, heard_at + imin / 2 - 1, heard_at + 1_000),
            None
        );
    }

    #[test]
    fn a_gateway_asking_for_a_repair_does_not_announce_its_summary_again() {
        let (mut writer, mut behind) = two_settled_engines();
        let start = SETTLED;
        writer.set(start, WALL + start, "k", b"1").unwrap();
        let _lost = run_timers(&mut writer, start, start);
        let summary_at = |engine: &mut Engine, now: u64| {
            engine.set_wall_clock(now, WALL + now);
            engine.trigger(now, TriggerReason::Manual);
            run_timers(engine, now, now + 200).remove(0)
        };
        // The difference heard, our summary out, the difference heard again:
        // a repair request, and no second summary of ours.
        behind.handle_datagram(start + 1_000, &summary_at(&mut writer, start + 1_000));
        assert!(!run_timers(&mut behind, start + 1_000, start + 1_500).is_empty());
        let summaries = behind.counters().summaries_sent;
        behind.handle_datagram(start + 2_000, &summary_at(&mut writer, start + 2_000));
        run_timers(&mut behind, start + 2_000, start + 2_500);
        assert!(behind.counters().bucket_digests_sent >= 1);
        assert_eq!(behind.counters().summaries_sent, summaries);
    }

    #[test]
    fn a_summary_of_what_we_held_before_is_a_peer_behind_us_not_a_reason_to_ask() {
        let (mut a, mut b) = two_engines_at_wall();
        let deliver = |from: &mut Engine, to: Option<&mut Engine>, now: u64| {
            from.handle_timeout(from.poll_timeout());
            let sent: Vec<Vec<u8>> = std::iter::from_fn(|| from.poll_transmit()).collect();
            assert!(!sent.is_empty());
            if let Some(to) = to {
                for datagram in &sent {
                    to.handle_datagram(now, datagram);
                }
            }
        };
        b.set(0, WALL, "o", b"1").unwrap();
        deliver(&mut b, Some(&mut a), 1);
        a.set(2, WALL + 2, "k", b"1").unwrap();
        deliver(&mut a, Some(&mut b), 3);
        assert_eq!((a.get("o"), b.get("k")), (Some(&b"1"[..]), Some(&b"1"[..])));
        // A second write b never hears: b is now one change behind a.
        a.set(10, WALL + 10, "k", b"2").unwrap();
        deliver(&mut a, None, 11);
        // b's summaries carry its current clock, later than a's write. a
        // misses the first and hears the second: a lost datagram, then a
        // summary that differs, with a later clock than anything a holds.
        let mut summary_at = |at: u64| {
            b.set_wall_clock(at, WALL + at);
            b.trigger(at, TriggerReason::Manual);
            loop {
                b.handle_timeout(b.poll_timeout());
                if let Some(summary) = b.poll_transmit() {
                    break summary;
                }
            }
        };
        let _lost = summary_at(1_000);
        let heard = summary_at(2_000);
        let mut now = 4_000;
        a.set_wall_clock(now, WALL + now);
        a.handle_datagram(now, &heard);
        while a.poll_timeout() <= 8_000 {
            now = a.poll_timeout().max(now);
            a.handle_timeout(now);
            while a.poll_transmit().is_some() {}
        }
        // Not a repair request asked again and again (b lacks, a holds):
        // at most one set of digests, showing b what it lacks.
        assert!(
            a.counters().bucket_digests_sent <= 1,
            "{} bucket digests sent",
            a.counters().bucket_digests_sent
        );
    }

    #[test]
    fn a_burst_of_writes_leaves_in_few_full_datagrams() {
        let mut engine = Engine::new(Config::default(), NodeId(1), 1, 0);
        for i in 0..100 {
            engine
                .set(0, 1_000, &format!("scene/{i}"), b"{\"on\":true}")
                .unwrap();
        }
        engine.handle_timeout(engine.config().push_delay_ms);
        let datagrams: Vec<Vec<u8>> = std::iter::from_fn(|| engine.poll_transmit()).collect();
        let bytes: usize = datagrams.iter().map(Vec::len).sum();
        assert!(datagrams.iter().all(|d| d.len() <= 1400));
        assert_eq!(
            datagrams.len(),
            bytes.div_ceil(1400),
            "{} datagrams for {bytes} bytes",
            datagrams.len()
        );
    }

    #[test]
    fn a_large_value_goes_out_as_fragments_and_reassembles() {
        let mut a = Engine::new(Config::default(), NodeId(1), 1, 0);
        let mut b = Engine::new(Config::default(), NodeId(2), 2, 0);
        let value: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        a.set(0, 1_000, "big", &value).unwrap();
        a.handle_timeout(a.poll_timeout());
        let datagrams: Vec<Vec<u8>> = std::iter::from_fn(|| a.poll_transmit()).collect();
        assert!(datagrams.len() >= 15);
        // The first datagram heard from a sender opens its replay window;
        // the rest may come in any order after it.
        b.handle_datagram(1, &datagrams[0]);
        for datagram in datagrams[1..].iter().rev() {
            b.handle_datagram(1, datagram);
        }
        assert!(b.get("big") == Some(&value[..]), "{:?}", b.counters());
    }

    /// An unkeyed datagram from `sender`, as a spoofer builds it.
    fn forged(sender: u64, seq: u32, message: &Message) -> Vec<u8> {
        let header = Header {
            message_type: message.message_type(),
            flags: 0,
            key_id: 0,
            sender: NodeId(sender),
            boot: 7,
            seq,
        };
        wire::encode(&header, message)
    }

    /// A join request (bucket digests that list nothing) from `sender`,
    /// with its own sequence number.
    fn join_request(sender: u64, seq: u32) -> Vec<u8> {
        let request = Message::BucketDigests(BucketDigests {
            digest: 0xbad,
            first: 0,
            end: BUCKETS as u16,
            buckets: Vec::new(),
        });
        forged(sender, seq, &request)
    }

    /// Runs `engine`'s timers from `now` until `until`; returns what it sent.
    fn run_timers(engine: &mut Engine, now: u64, until: u64) -> Vec<Vec<u8>> {
        run_timers_timed(engine, now, until)
            .into_iter()
            .map(|(_, datagram)| datagram)
            .collect()
    }

    /// [`run_timers`], each datagram with when it was sent.
    fn run_timers_timed(engine: &mut Engine, mut now: u64, until: u64) -> Vec<(u64, Vec<u8>)> {
        let mut sent = Vec::new();
        loop {
            sent.extend(
                std::iter::from_fn(|| engine.poll_transmit()).map(|datagram| (now, datagram)),
            );
            now = now.max(engine.poll_timeout());
            if now > until {
                return sent;
            }
            engine.handle_timeout(now);
        }
    }

    #[test]
    fn one_forged_summary_draws_no_bucket_digests_after_a_difference_mended_by_a_push() {
        let (mut a, mut b) = two_engines_at_wall();
        a.set(0, WALL, "first", b"1").unwrap();
        a.handle_timeout(0);
        for datagram in std::iter::from_fn(|| a.poll_transmit()) {
            b.handle_datagram(0, &datagram);
        }
        // b writes, and a misses the push for now; a's next summary shows
        // b a difference, which b announces its own summary about.
        b.set(10, WALL + 10, "second", b"2").unwrap();
        b.handle_timeout(10);
        let push: Vec<Vec<u8>> = std::iter::from_fn(|| b.poll_transmit()).collect();
        a.trigger(50, TriggerReason::Manual);
        let summary = run_timers(&mut a, 50, 100).pop().expect("a's summary");
        b.handle_datagram(100, &summary);
        let announced = b.counters().summaries_sent;
        run_timers(&mut b, 100, 400);
        assert!(b.counters().summaries_sent > announced);
        // The push then mends the difference; b hears no summary equal to
        // its own.
        for datagram in &push {
            a.handle_datagram(400, datagram);
        }
        assert_eq!(a.store().digest(), b.store().digest());
        // One forged summary with another digest, as new as can be.
        let lie = Message::Summary(Summary {
            digest: 0xbad,
            entries: 1,
            clock: Hlc::new(WALL + 400, 0),
        });
        let digests_sent = b.counters().bucket_digests_sent;
        b.handle_datagram(400, &forged(9, 1, &lie));
        run_timers(&mut b, 400, 1_000);
        assert_eq!(
            b.counters().bucket_digests_sent,
            digests_sent,
            "one forged summary drew bucket digests"
        );
        // The same digest heard again after b's answer is a real
        // difference: now bucket digests go out.
        b.handle_datagram(1_000, &forged(9, 2, &lie));
        run_timers(&mut b, 1_000, 1_100);
        assert!(b.counters().bucket_digests_sent > digests_sent);
    }

    /// Runs two engines on a lossless LAN until `until`: every datagram of
    /// one reaches the other at once, timers fire in time order.
    fn pump(pair: &mut [Engine; 2], now: u64, until: u64) {
        pump_losing(pair, now, until, |_, _| false);
    }

    /// [`pump`], losing each datagram for which `lost(sender index,
    /// datagram)` holds.
    fn pump_losing(
        pair: &mut [Engine; 2],
        mut now: u64,
        until: u64,
        mut lost: impl FnMut(usize, &[u8]) -> bool,
    ) {
        loop {
            let mut sent = false;
            for from in 0..2 {
                while let Some(datagram) = pair[from].poll_transmit() {
                    sent = true;
                    if !lost(from, &datagram) {
                        pair[1 - from].handle_datagram(now, &datagram);
                    }
                }
            }
            if sent {
                continue;
            }
            now = pair.iter().map(Engine::poll_timeout).min().unwrap_or(until);
            if now > until {
                return;
            }
            for engine in pair.iter_mut() {
                if engine.poll_timeout() <= now {
                    engine.handle_timeout(now);
                }
            }
        }
    }

    #[test]
    fn a_join_request_is_not_served_again_within_the_window_by_a_gateway_that_heard_it_served() {
        let mut pair = [
            Engine::new(Config::default(), NodeId(1), 1, 0),
            Engine::new(Config::default(), NodeId(2), 2, 0),
        ];
        for i in 0..500 {
            pair[0]
                .set(0, 1_000, &format!("device/{i}"), b"{\"on\":true}")
                .unwrap();
        }
        pump(&mut pair, 0, 5_000);
        assert_eq!(pair[0].store().digest(), pair[1].store().digest());
        let joined_buckets = (0..BUCKETS)
            .filter(|&bucket| pair[0].store().bucket_summary(bucket).count > 0)
            .count();
        assert!(joined_buckets >= JOIN_BUCKETS_MIN, "{joined_buckets}");
        let repairs = |engine: &Engine| engine.counters().repairs_sent;
        // Gateway 1 alone hears a join request and serves it; gateway 0
        // (the origin of every entry, so the first to answer a request it
        // hears) hears that answer.
        pair[1].handle_datagram(5_000, &join_request(9, 1));
        pump(&mut pair, 5_000, 5_500);
        assert!(repairs(&pair[1]) >= joined_buckets as u64);
        assert_eq!(repairs(&pair[0]), 0);
        // Another join request, a fresh one, within the window: gateway 0
        // sends nothing, gateway 1's answer served it.
        pair[0].handle_datagram(5_500, &join_request(9, 2));
        pump(&mut pair, 5_500, 5_900);
        assert_eq!(repairs(&pair[0]), 0, "{:?}", pair[0].counters());
        assert!(pair[0].counters().repairs_paced >= joined_buckets as u64);
        // After the window the next one is answered again.
        let after = 5_000 + Config::default().repair_bucket_interval_ms + 600;
        pair[0].handle_datagram(after, &join_request(9, 3));
        pump(&mut pair, after, after + 1_000);
        assert!(repairs(&pair[0]) >= joined_buckets as u64);
    }

    fn is_repair(datagram: &[u8]) -> bool {
        matches!(
            wire::decode(datagram),
            Ok((
                _,
                Message::Entries(Entries {
                    repair: Some(_),
                    ..
                })
            ))
        )
    }

    #[test]
    fn a_repair_lost_on_its_way_is_asked_for_again_once_it_may_be_sent_again() {
        let (a, b) = two_settled_engines();
        let mut pair = [a, b];
        let start = SETTLED;
        pair[0].set(start, WALL + start, "k", b"1").unwrap();
        let _lost = run_timers(&mut pair[0], start, start + 2_000);
        // The next push shows b the gap and the difference: b asks at once,
        // a answers, and the answer is lost. a sends no bucket twice to the
        // same digests within the pacing interval, so b's quick asks go
        // unanswered; its last one, after the interval, is answered.
        let pushed_at = start + 3_000;
        pair[0]
            .set(pushed_at, WALL + pushed_at, "k2", b"2")
            .unwrap();
        let mut repairs = 0;
        let interval = Config::default().repair_bucket_interval_ms;
        pump_losing(
            &mut pair,
            pushed_at,
            pushed_at + interval + 500,
            |from, datagram| {
                let repair = from == 0 && is_repair(datagram);
                repairs += repair as u32;
                repair && repairs == 1
            },
        );
        assert!(
            pair[0].counters().repairs_paced >= 1,
            "{:?}",
            pair[0].counters()
        );
        assert_eq!(repairs, 2);
        assert_eq!(pair[1].get("k"), Some(&b"1"[..]));
        assert!(
            pair[1].counters().bucket_digests_sent <= Config::default().repair_requests_max as u64
        );
    }

    #[test]
    fn with_writes_flowing_a_peer_that_differs_before_and_after_our_summary_is_a_difference() {
        // Too many buckets for the fast path (digests in one datagram): a
        // difference is acted on once confirmed.
        let (a, b) = two_settled_engines();
        let mut pair = [a, b];
        let start = SETTLED;
        for i in 0..300 {
            pair[0]
                .set(start, WALL + start, &format!("device/{i}"), b"{}")
                .unwrap();
        }
        pump(&mut pair, start, start + 5_000);
        assert_eq!(pair[0].store().digest(), pair[1].store().digest());
        assert!(!pair[1].digests_fit_one());
        let lost_at = start + 10_000;
        pair[0].set(lost_at, WALL + lost_at, "k", b"1").unwrap();
        let _lost = run_timers(&mut pair[0], lost_at, lost_at + 2_000);
        // A write every 100 ms, each push arriving; every summary is lost,
        // so b never hears one digest of a's twice, nor a one of b's.
        let stream_at = lost_at + 3_000;
        let is_summary =
            |datagram: &[u8]| matches!(wire::decode(datagram), Ok((_, Message::Summary(_))));
        for write in 0..10u64 {
            let now = stream_at + write * 100;
            pair[0]
                .set(now, WALL + now, &format!("stream/{write}"), b"{}")
                .unwrap();
            pump_losing(&mut pair, now, now + 99, |_, datagram| is_summary(datagram));
        }
        assert_eq!(
            pair[1].get("k"),
            Some(&b"1"[..]),
            "{:?}",
            pair[1].counters()
        );
    }
}
