//! Byzantine nodes for the simulator: a forger that lies with well-formed
//! messages, and a measure of what one forged datagram makes the group send.
//!
//! The [`Forger`] is the worst peer of an open group (or a compromised
//! member of a keyed one: it sends what it likes, unsealed, so run it
//! against unkeyed engines). On every attack tick it does one of:
//! entries with the largest version or versions days ahead; summaries and
//! bucket digests with clocks days ahead; a fresh summary under an honest
//! gateway's node id (a forged clash); a replay of anything it ever heard;
//! spoofed summaries and bucket digests that claim other data or an empty
//! store; and, so that something it says is believable, writes within the
//! clock bound to its own keys (`forged/*`). It never writes honest keys
//! with a believable version, so the tests can hold honest writes to an
//! exact outcome.

use std::collections::{BTreeSet, VecDeque};

use rand::{Rng, SeedableRng};

use super::{Gateway, Persisted, Sim};
use crate::engine::SeededRng;
use crate::engine::store::BUCKETS;
use crate::proto::{BucketSummary, Hlc, NodeId, Version};
use crate::wire::{
    self, BucketDigests, Entries, Fragment, Header, Message, Packet, RepairTag, Summary, WireEntry,
};

const DAY_MS: u64 = 86_400_000;
/// Datagrams the forger remembers for replay.
const HEARD_MAX: usize = 4096;

/// What the forger did, per attack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForgerCounts {
    pub max_versions: u64,
    pub future_entries: u64,
    pub future_clocks: u64,
    pub clashing_ids: u64,
    pub replays: u64,
    pub spoofed_digests: u64,
    pub own_writes: u64,
}

/// A lying peer (see the module doc).
pub struct Forger {
    rng: SeededRng,
    node_id: NodeId,
    boot: u32,
    seq: u32,
    wall_offset_ms: i64,
    next_attack: u64,
    interval_ms: u64,
    active_until: u64,
    /// Honest keys to attack with impossible versions.
    targets: Vec<String>,
    heard: VecDeque<Vec<u8>>,
    ids: BTreeSet<NodeId>,
    outbox: VecDeque<Vec<u8>>,
    pub counts: ForgerCounts,
}

impl Forger {
    /// A forger attacking every `interval_ms` until `active_until`, aiming
    /// its impossible versions at `targets`.
    pub fn new(
        seed: u64,
        now: u64,
        interval_ms: u64,
        active_until: u64,
        targets: Vec<String>,
    ) -> Forger {
        let mut rng = SeededRng::seed_from_u64(seed);
        Forger {
            node_id: NodeId(rng.random()),
            boot: rng.random(),
            seq: 0,
            wall_offset_ms: 0,
            next_attack: now + interval_ms,
            interval_ms: interval_ms.max(1),
            active_until,
            targets,
            heard: VecDeque::new(),
            ids: BTreeSet::new(),
            outbox: VecDeque::new(),
            counts: ForgerCounts::default(),
            rng,
        }
    }

    fn wall(&self, now: u64) -> u64 {
        (now as i64 + self.wall_offset_ms).max(0) as u64
    }

    fn send_as(&mut self, sender: NodeId, boot: u32, message: &Message) {
        self.seq += 1;
        let header = Header {
            message_type: message.message_type(),
            flags: 0,
            key_id: 0,
            sender,
            boot,
            seq: self.seq,
        };
        self.outbox.push_back(wire::encode(&header, message));
    }

    fn send(&mut self, message: &Message) {
        let (id, boot) = (self.node_id, self.boot);
        self.send_as(id, boot, message);
    }

    fn target(&mut self) -> String {
        match self.targets.len() {
            0 => "k".to_owned(),
            len => self.targets[self.rng.random_range(0..len)].clone(),
        }
    }

    fn entry(&mut self, key: String, hlc: Hlc) -> Message {
        let origin = NodeId(self.rng.random());
        // A digest no honest gateway holds: each receiver differs after
        // merging and treats it as a summary.
        let digest = Some(self.rng.random());
        Message::Entries(Entries {
            repair: None,
            digest,
            entries: vec![WireEntry {
                key,
                version: Version { hlc, origin },
                value: Some(b"\"forged\"".to_vec()),
            }],
        })
    }

    fn attack(&mut self, now: u64) {
        let wall = self.wall(now);
        let days_ahead = Hlc::new(wall + self.rng.random_range(1..30) * DAY_MS, 0);
        match self.rng.random_range(0..8) {
            0 => {
                let key = self.target();
                let message = self.entry(key, Hlc::MAX);
                self.send(&message);
                self.counts.max_versions += 1;
            }
            1 => {
                let key = self.target();
                let message = if self.rng.random_bool(0.5) {
                    self.entry(key, days_ahead)
                } else {
                    Message::Fragment(Fragment {
                        key,
                        version: Version {
                            hlc: days_ahead,
                            origin: self.node_id,
                        },
                        total_len: 60_000,
                        offset: 0,
                        chunk: vec![0; 1000],
                    })
                };
                self.send(&message);
                self.counts.future_entries += 1;
            }
            2 => {
                // Days ahead, or just inside the bound (which moves clocks
                // as far as a peer may).
                let clock = if self.rng.random_bool(0.5) {
                    days_ahead
                } else {
                    Hlc::new(wall + 299_000, 0)
                };
                let message = Message::Summary(Summary {
                    digest: self.rng.random(),
                    entries: 1,
                    clock,
                });
                self.send(&message);
                self.counts.future_clocks += 1;
            }
            3 => {
                // A fresh summary under an honest gateway's id: the best
                // clash evidence an open group can be shown.
                let ids: Vec<NodeId> = self.ids.iter().copied().collect();
                if ids.is_empty() {
                    return;
                }
                let victim = ids[self.rng.random_range(0..ids.len())];
                let boot = self.rng.random();
                let message = Message::Summary(Summary {
                    digest: self.rng.random(),
                    entries: 0,
                    clock: Hlc::new(wall, 0),
                });
                self.send_as(victim, boot, &message);
                self.counts.clashing_ids += 1;
            }
            4 | 5 => {
                if self.heard.is_empty() {
                    return;
                }
                let index = self.rng.random_range(0..self.heard.len());
                let replay = self.heard[index].clone();
                self.outbox.push_back(replay);
                self.counts.replays += 1;
            }
            6 => {
                let message = if self.rng.random_bool(0.5) {
                    Message::BucketDigests(BucketDigests {
                        digest: self.rng.random(),
                        first: 0,
                        end: BUCKETS as u16,
                        buckets: Vec::new(),
                    })
                } else {
                    let bucket = self.rng.random_range(0..BUCKETS as u16);
                    Message::BucketDigests(BucketDigests {
                        digest: self.rng.random(),
                        first: bucket,
                        end: bucket + 1,
                        buckets: vec![(
                            bucket,
                            BucketSummary {
                                digest: self.rng.random(),
                                count: 1,
                                max_hlc: Hlc::new(wall, 0),
                            },
                        )],
                    })
                };
                self.send(&message);
                self.counts.spoofed_digests += 1;
            }
            _ => {
                let key = format!("forged/{}", self.rng.random_range(0..4));
                let message = self.entry(key, Hlc::new(wall, 0));
                self.send(&message);
                self.counts.own_writes += 1;
            }
        }
    }
}

impl Gateway for Forger {
    fn handle_datagram(&mut self, _now: u64, bytes: &[u8]) {
        if let Ok(packet) = Packet::new_checked(bytes) {
            self.ids.insert(packet.sender());
        }
        if self.heard.len() == HEARD_MAX {
            self.heard.pop_front();
        }
        self.heard.push_back(bytes.to_vec());
    }

    fn handle_timeout(&mut self, now: u64) {
        while self.next_attack <= now {
            self.next_attack += self.interval_ms;
            if now < self.active_until {
                self.attack(now);
            }
        }
    }

    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.outbox.pop_front()
    }

    fn poll_timeout(&self) -> u64 {
        if self.next_attack < self.active_until {
            self.next_attack
        } else {
            u64::MAX
        }
    }

    fn write(&mut self, _now: u64, _wall_ms: u64, _key: &str, _value: Option<&[u8]>) {}

    fn trigger(&mut self, _now: u64) {}

    fn set_wall_clock(&mut self, now: u64, wall_ms: u64) {
        self.wall_offset_ms = wall_ms as i64 - now as i64;
    }

    fn data(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        Default::default()
    }

    fn digest(&self) -> u64 {
        0
    }

    fn is_idle(&self) -> bool {
        true
    }

    fn persisted(&self) -> Persisted {
        Persisted::default()
    }

    fn is_honest(&self) -> bool {
        false
    }
}

/// An unkeyed datagram from `sender`, as a spoofer on the LAN builds it.
pub fn forge(sender: NodeId, seq: u32, message: &Message) -> Vec<u8> {
    let header = Header {
        message_type: message.message_type(),
        flags: 0,
        key_id: 0,
        sender,
        boot: 0x5b00f,
        seq,
    };
    wire::encode(&header, message)
}

/// What the group sent in answer to one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub bytes_in: u64,
    /// Bytes the gateways sent within the window beyond what they send
    /// without the datagram (a twin run from the same state).
    pub bytes_out: u64,
    pub datagrams_out: u64,
}

impl Answer {
    pub fn factor(&self) -> f64 {
        self.bytes_out as f64 / self.bytes_in.max(1) as f64
    }
}

/// Injects the datagram `make` builds into a copy of the group `group`
/// builds (deterministic, so each call gives the same group), runs
/// `window_ms`, and compares with the same run without it.
pub fn answer_to(
    group: impl Fn() -> Sim,
    make: impl Fn(&Sim) -> Vec<u8>,
    window_ms: u64,
) -> Answer {
    answer_to_each(group, |sim| vec![make(sim)], 0, window_ms)
}

/// Like [`answer_to`] for several datagrams, injected `gap_ms` apart; the
/// window starts at the first.
pub fn answer_to_each(
    group: impl Fn() -> Sim,
    make: impl Fn(&Sim) -> Vec<Vec<u8>>,
    gap_ms: u64,
    window_ms: u64,
) -> Answer {
    let mut baseline = group();
    let start = baseline.traffic();
    baseline.run_for(window_ms);
    let quiet = baseline.traffic();
    let mut attacked = group();
    let end = attacked.now() + window_ms;
    let datagrams = make(&attacked);
    let bytes_in = datagrams.iter().map(|datagram| datagram.len() as u64).sum();
    for datagram in datagrams {
        attacked.inject(datagram);
        attacked.run_until(end.min(attacked.now() + gap_ms));
    }
    attacked.run_until(end);
    let loud = attacked.traffic();
    Answer {
        bytes_in,
        bytes_out: (loud.bytes - start.bytes).saturating_sub(quiet.bytes - start.bytes),
        datagrams_out: (loud.datagrams - start.datagrams)
            .saturating_sub(quiet.datagrams - start.datagrams),
    }
}

/// The attacks [`answer_to`] is measured for, by name: every message type,
/// forged as a spoofer would, against a group whose data it has seen.
pub fn forged_datagrams(sim: &Sim) -> Vec<(&'static str, Vec<u8>)> {
    let spoofer = NodeId(0x5b00f);
    let wall = sim.wall_ms(0);
    let held = sim
        .gateway(0)
        .and_then(|gateway| gateway.engine())
        .map(|engine| {
            let (key, entry) = engine.store().iter().next().expect("a populated group");
            (key.to_owned(), entry.version)
        });
    let (key, version) = held.unwrap_or(("k".to_owned(), Version::default()));
    let older = Version {
        hlc: Hlc(version.hlc.0.saturating_sub(1)),
        origin: version.origin,
    };
    let entry = |version: Version| {
        Message::Entries(Entries {
            repair: Some(RepairTag {
                bucket: 0,
                digest: 1,
            }),
            digest: Some(0xbad),
            entries: vec![WireEntry {
                key: key.clone(),
                version,
                value: Some(b"\"old\"".to_vec()),
            }],
        })
    };
    let summary = |clock: Hlc| {
        Message::Summary(Summary {
            digest: 0xbad,
            entries: 1,
            clock,
        })
    };
    let all_buckets = Message::BucketDigests(BucketDigests {
        digest: 0xbad,
        first: 0,
        end: BUCKETS as u16,
        buckets: (0..BUCKETS as u16)
            .map(|bucket| {
                let summary = BucketSummary {
                    digest: 0xbad,
                    count: 1,
                    max_hlc: Hlc::new(1, 0),
                };
                (bucket, summary)
            })
            .collect(),
    });
    vec![
        (
            "summary, other digest",
            forge(spoofer, 1, &summary(Hlc::new(wall, 0))),
        ),
        (
            "summary, clock 8 days ahead",
            forge(spoofer, 1, &summary(Hlc::new(wall + 8 * DAY_MS, 0))),
        ),
        (
            "entries, stale version, a digest no one holds",
            forge(spoofer, 1, &entry(older)),
        ),
        (
            "entries, largest version",
            forge(
                spoofer,
                1,
                &entry(Version {
                    hlc: Hlc::MAX,
                    origin: spoofer,
                }),
            ),
        ),
        (
            "fragment, 60 kB announced",
            forge(
                spoofer,
                1,
                &Message::Fragment(Fragment {
                    key: "junk".into(),
                    version: Version {
                        hlc: Hlc::new(wall, 0),
                        origin: spoofer,
                    },
                    total_len: 60_000,
                    offset: 0,
                    chunk: vec![0; 1000],
                }),
            ),
        ),
        (
            "bucket digests, every bucket older",
            forge(spoofer, 1, &all_buckets),
        ),
    ]
}

/// The join-like request: bucket digests that list no bucket, as an empty
/// gateway sends. Answered with the store (the join exception), paced.
/// `seq` is its sequence number: each request of a series needs its own,
/// or the replay window drops it before the engine sees it.
pub fn empty_store_digests(seq: u32) -> Vec<u8> {
    forge(
        NodeId(0x5b00f),
        seq,
        &Message::BucketDigests(BucketDigests {
            digest: 0x0e,
            first: 0,
            end: BUCKETS as u16,
            buckets: Vec::new(),
        }),
    )
}

/// `n` gateways holding `entries` entries written across them, settled
/// (deterministic for a seed): the group the amplification figures use.
pub fn settled_group(seed: u64, n: usize, entries: usize) -> Sim {
    let mut sim = Sim::new(
        seed,
        n,
        super::Medium::default(),
        super::engine_factory(crate::engine::Config::default()),
    );
    for i in 0..entries {
        sim.write(
            i % n,
            &format!("device/{i:04}"),
            Some(b"{\"on\":true,\"level\":42}"),
        );
    }
    let settled = sim.run_until_condition(30 * 60_000, Sim::settled);
    assert!(settled.is_some(), "seed {seed}: the group did not settle");
    sim
}

/// Runs a [`Forger`] against four honest gateways (one of them writing)
/// for `attack_ms`; returns the largest distance, in ms, any honest
/// gateway's clock got ahead of its own wall clock.
pub fn clock_drift_under_attack(seed: u64, attack_ms: u64) -> i64 {
    let mut sim = settled_group(seed, 4, 100);
    let start = sim.now();
    let forger = Forger::new(
        seed,
        start,
        50,
        start + attack_ms,
        vec!["device/0001".into()],
    );
    sim.add_gateway(Box::new(forger));
    let mut drift = i64::MIN;
    while sim.now() < start + attack_ms {
        sim.write(0, "device/0002", Some(b"1"));
        sim.run_for(5_000);
        for node in 0..4 {
            if let Some(engine) = sim.gateway(node).and_then(|gateway| gateway.engine()) {
                let clock = engine.clock_high_water().physical_ms() as i64;
                drift = drift.max(clock - sim.wall_ms(node) as i64);
            }
        }
    }
    drift
}
