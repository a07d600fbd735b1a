//! The work on a write's path with warm caches: the writer parsing the
//! `set` request, compacting the value and writing, sealing and queueing
//! the push; a receiver opening and applying it. The namespace bench
//! measures the same path inside the daemons, where each process wakes
//! with cold caches after 50 ms asleep beside fifteen others; set side by
//! side, the two say how much of the path is work and how much is waking.
//!
//! `cargo bench --bench hotpath` (no root needed).

use std::time::{Duration, Instant};

use gwsync::control::{Request, parse_request};
use gwsync::crypto::{GroupKey, keyring_of};
use gwsync::driver::compact_json;
use gwsync::engine::{Config, Engine, Event};
use gwsync::proto::NodeId;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// As the namespace bench: 1,000 writes 50 ms apart, here cycling over
/// 1,000 keys so the store stays the size it reaches there.
const WRITES: u64 = 20_000;
const KEYS: u64 = 1_000;
const GAP_MS: u64 = 50;

#[derive(Default)]
struct Stages {
    parse: Duration,
    compact: Duration,
    write_and_seal: Duration,
    receive: Duration,
}

fn main() {
    let key = GroupKey::from_bytes([7; 32]);
    let mut writer = Engine::new(Config::default(), NodeId(1), 1, 0);
    let mut receiver = Engine::new(Config::default(), NodeId(2), 2, 0);
    writer.set_keyring(
        keyring_of(std::slice::from_ref(&key)),
        StdRng::seed_from_u64(3),
    );
    receiver.set_keyring(keyring_of(&[key]), StdRng::seed_from_u64(4));
    let wall_start_ms = 1_780_000_000_000;
    let mut stages = Stages::default();
    let mut datagrams = 0;
    for write in 0..WRITES {
        let now = 1_000 + write * GAP_MS;
        let wall_ms = wall_start_ms + now;
        let line = format!(
            r#"{{"op":"set","key":"bench/lossless/{}","value":{{"n": {write}}}}}"#,
            write % KEYS
        );
        let started = Instant::now();
        let Ok(Request::Set { key, value }) = parse_request(line.as_bytes()) else {
            panic!("not a set: {line}");
        };
        let parsed = Instant::now();
        let compact = compact_json(&value).expect("valid JSON");
        let compacted = Instant::now();
        writer.set_wall_clock(now, wall_ms);
        writer
            .set(now, wall_ms, &key, compact.as_bytes())
            .expect("write");
        if writer.poll_timeout() <= now {
            writer.handle_timeout(now);
        }
        let pushed: Vec<Vec<u8>> = std::iter::from_fn(|| writer.poll_transmit()).collect();
        while writer.poll_event().is_some() {}
        let sealed = Instant::now();
        receiver.set_wall_clock(now, wall_ms);
        for datagram in &pushed {
            receiver.handle_datagram(now, datagram);
        }
        if receiver.poll_timeout() <= now {
            receiver.handle_timeout(now);
        }
        while receiver.poll_transmit().is_some() {}
        let changes = std::iter::from_fn(|| receiver.poll_event())
            .filter(|event| matches!(event, Event::Changed { .. }))
            .count();
        let received = Instant::now();
        assert_eq!(changes, 1, "write {write}: the receiver applies it");
        datagrams += pushed.len();
        stages.parse += parsed - started;
        stages.compact += compacted - parsed;
        stages.write_and_seal += sealed - compacted;
        stages.receive += received - sealed;
    }
    let per_write = |total: Duration| total.as_secs_f64() * 1e6 / WRITES as f64;
    println!("| stage, warm | us per write |");
    println!("|---|---|");
    println!(
        "| writer: parse the set request | {:.2} |",
        per_write(stages.parse)
    );
    println!(
        "| writer: compact the value | {:.2} |",
        per_write(stages.compact)
    );
    println!(
        "| writer: write, build and seal the push | {:.2} |",
        per_write(stages.write_and_seal)
    );
    println!(
        "| receiver: open and apply the push, the change event | {:.2} |",
        per_write(stages.receive)
    );
    println!(
        "({WRITES} writes over {KEYS} keys, {:.2} datagrams per write, keyed)",
        datagrams as f64 / WRITES as f64
    );
}
