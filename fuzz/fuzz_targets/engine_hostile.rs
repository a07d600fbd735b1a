//! One keyed Engine under arbitrary sequences of *valid* messages from
//! lying peers, sealed with the group key, interleaved with time steps,
//! wall-clock jumps, local writes and replays of anything heard or sent.
//!
//! Messages are built from `arbitrary` as wire structs, so the fuzzer spends
//! its time on the engine's logic, not on the decoder (fuzzed by `decode`).
//! Timestamps are drawn near the engine's clock, at the largest values and
//! anywhere, to probe the clock bound and version arithmetic.
//!
//! Invariants checked after every step: nothing panics; the clock stays
//! within `clock_ahead_max_ms` of the largest wall clock given (plus the
//! local writes' own successors); every datagram sent fits
//! `datagram_bytes_max`; a local write either succeeds and is readable or
//! fails with a named error.
#![no_main]

use arbitrary::Arbitrary;
use gwsync::crypto::{GroupKey, Keyring};
use gwsync::engine::{Config, Engine, TriggerReason};
use gwsync::proto::{BucketSummary, Hlc, NodeId, Version};
use gwsync::wire::{
    BucketDigests, Entries, Fragment, Header, Message, RepairTag, Summary, WireEntry,
};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;

const WALL_START_MS: u64 = 1_780_000_000_000;
const KEYS: [&str; 4] = ["door/code", "scene/1", "room/2", "big"];
const OUR_ID: NodeId = NodeId(0x00c0_ffee);

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Stamp {
    /// Near our wall clock, seconds either way.
    Near(i16),
    /// Days away either way.
    Days(i8),
    Max,
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct FuzzEntry {
    key: u8,
    stamp: Stamp,
    origin: u8,
    value: Option<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
enum FuzzMessage {
    Summary {
        same_digest: bool,
        digest: u64,
        entries: u32,
        clock: Stamp,
    },
    Entries {
        repair: Option<(u16, u64)>,
        digest: Option<(bool, u64)>,
        entries: Vec<FuzzEntry>,
    },
    Fragment {
        key: u8,
        stamp: Stamp,
        origin: u8,
        total_len: u16,
        offset: u16,
        chunk: Vec<u8>,
    },
    BucketDigests {
        same_digest: bool,
        digest: u64,
        first: u16,
        span: u16,
        buckets: Vec<(u16, u64, u16, Stamp)>,
    },
}

#[derive(Arbitrary, Debug)]
enum Step {
    Deliver {
        /// Peer 0 claims our own node id.
        sender: u8,
        boot: u8,
        seq: u16,
        message: FuzzMessage,
    },
    /// Delivers again something delivered or sent before.
    Replay(u16),
    Advance(u16),
    /// The wall clock is set, by seconds either way.
    WallJump(i32),
    Set(u8, Vec<u8>),
    Delete(u8),
    Trigger,
}

struct World {
    engine: Engine,
    keyring: Keyring,
    nonces: StdRng,
    now: u64,
    wall_offset: i64,
    wall_max: u64,
    heard: Vec<Vec<u8>>,
}

impl World {
    fn wall(&self) -> u64 {
        (WALL_START_MS as i64 + self.now as i64 + self.wall_offset) as u64
    }

    fn stamp(&self, stamp: Stamp) -> Hlc {
        let wall = self.wall() as i64;
        match stamp {
            Stamp::Near(seconds) => Hlc::new((wall + seconds as i64 * 1000).max(0) as u64, 0),
            Stamp::Days(days) => Hlc::new((wall + days as i64 * 86_400_000).max(0) as u64, 0),
            Stamp::Max => Hlc::MAX,
            Stamp::Raw(raw) => Hlc(raw),
        }
    }

    fn version(&self, stamp: Stamp, origin: u8) -> Version {
        Version {
            hlc: self.stamp(stamp),
            origin: NodeId(origin as u64 % 4),
        }
    }

    fn message(&self, message: FuzzMessage) -> Option<Message> {
        let store = self.engine.store();
        Some(match message {
            FuzzMessage::Summary {
                same_digest,
                digest,
                entries,
                clock,
            } => Message::Summary(Summary {
                digest: if same_digest { store.digest() } else { digest },
                entries,
                clock: self.stamp(clock),
            }),
            FuzzMessage::Entries {
                repair,
                digest,
                entries,
            } => Message::Entries(Entries {
                repair: repair.map(|(bucket, digest)| RepairTag { bucket, digest }),
                digest: digest
                    .map(|(same_digest, digest)| if same_digest { store.digest() } else { digest }),
                entries: entries
                    .into_iter()
                    .take(20)
                    .map(|entry| WireEntry {
                        key: KEYS[entry.key as usize % KEYS.len()].to_owned(),
                        version: self.version(entry.stamp, entry.origin),
                        value: entry.value,
                    })
                    .collect(),
            }),
            FuzzMessage::Fragment {
                key,
                stamp,
                origin,
                total_len,
                offset,
                chunk,
            } => {
                // Only what the decoder lets through reaches the engine.
                let end = offset as u64 + chunk.len() as u64;
                if chunk.is_empty() || end > total_len as u64 {
                    return None;
                }
                Message::Fragment(Fragment {
                    key: KEYS[key as usize % KEYS.len()].to_owned(),
                    version: self.version(stamp, origin),
                    total_len: total_len as u32,
                    offset: offset as u32,
                    chunk,
                })
            }
            FuzzMessage::BucketDigests {
                same_digest,
                digest,
                first,
                span,
                mut buckets,
            } => {
                let first = first % 257;
                let end = (first as u32 + span as u32).min(256) as u16;
                buckets.sort_by_key(|bucket| bucket.0);
                buckets.dedup_by_key(|bucket| bucket.0);
                let buckets = buckets
                    .into_iter()
                    .filter(|bucket| bucket.0 >= first && bucket.0 < end)
                    .map(|(bucket, digest, count, stamp)| {
                        let summary = BucketSummary {
                            digest,
                            count: count as u32,
                            max_hlc: self.stamp(stamp),
                        };
                        (bucket, summary)
                    })
                    .collect();
                Message::BucketDigests(BucketDigests {
                    digest: if same_digest { store.digest() } else { digest },
                    first,
                    end,
                    buckets,
                })
            }
        })
    }

    fn deliver(&mut self, bytes: &[u8]) {
        self.engine.set_wall_clock(self.now, self.wall());
        self.engine.handle_datagram(self.now, bytes);
    }

    fn drain(&mut self) {
        let limit = self.engine.config().datagram_bytes_max;
        while let Some(datagram) = self.engine.poll_transmit() {
            assert!(datagram.len() <= limit, "{} bytes sent", datagram.len());
            if self.heard.len() < 64 {
                self.heard.push(datagram);
            }
        }
        while self.engine.poll_event().is_some() {}
    }

    fn check(&self) {
        let bound = self.engine.config().clock_ahead_max_ms;
        let high_water = self.engine.clock_high_water().physical_ms();
        assert!(
            high_water <= self.wall_max + bound + 1,
            "clock {high_water} past {} + {bound}",
            self.wall_max
        );
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let key = GroupKey::from_bytes([7; 32]);
    let mut engine = Engine::new(Config::default(), OUR_ID, 1, 0);
    engine.set_keyring(Some(Keyring::new(&key)), StdRng::seed_from_u64(2));
    engine.set_wall_clock(0, WALL_START_MS);
    let mut world = World {
        engine,
        keyring: Keyring::new(&key),
        nonces: StdRng::seed_from_u64(3),
        now: 0,
        wall_offset: 0,
        wall_max: WALL_START_MS,
        heard: Vec::new(),
    };
    for step in steps.into_iter().take(200) {
        match step {
            Step::Deliver {
                sender,
                boot,
                seq,
                message,
            } => {
                let Some(message) = world.message(message) else {
                    continue;
                };
                let sender = match sender % 4 {
                    0 => OUR_ID,
                    other => NodeId(other as u64),
                };
                let header = Header {
                    message_type: message.message_type(),
                    flags: 0,
                    key_id: 0,
                    sender,
                    boot: boot as u32,
                    seq: seq as u32,
                };
                let mut payload = Vec::new();
                message.emit_payload(&mut payload);
                let sealed = world
                    .keyring
                    .seal(&header.to_bytes(), &payload, &mut world.nonces);
                world.deliver(&sealed);
                if world.heard.len() < 64 {
                    world.heard.push(sealed);
                }
            }
            Step::Replay(index) => {
                if !world.heard.is_empty() {
                    let bytes = world.heard[index as usize % world.heard.len()].clone();
                    world.deliver(&bytes);
                }
            }
            Step::Advance(ms) => {
                world.now += ms as u64;
                world.engine.set_wall_clock(world.now, world.wall());
                let now = world.now;
                if world.engine.poll_timeout() <= now {
                    world.engine.handle_timeout(now);
                }
            }
            Step::WallJump(seconds) => {
                world.wall_offset = (world.wall_offset + seconds as i64 * 1000)
                    .max(-(WALL_START_MS as i64));
                world.engine.set_wall_clock(world.now, world.wall());
            }
            Step::Set(key, value) => {
                let key = KEYS[key as usize % KEYS.len()];
                let (now, wall) = (world.now, world.wall());
                if world.engine.set(now, wall, key, &value).is_ok() {
                    assert_eq!(world.engine.get(key), Some(&value[..]));
                }
            }
            Step::Delete(key) => {
                let key = KEYS[key as usize % KEYS.len()];
                let (now, wall) = (world.now, world.wall());
                if world.engine.delete(now, wall, key).is_ok() {
                    assert_eq!(world.engine.get(key), None);
                }
            }
            Step::Trigger => world.engine.trigger(world.now, TriggerReason::Manual),
        }
        world.wall_max = world.wall_max.max(world.wall());
        world.drain();
        world.check();
    }
});
