//! The work on a write's path: the writer parsing the `set` request,
//! compacting the value and writing, sealing and queueing the push; a
//! receiver opening and applying it. The namespace bench measures the same
//! path inside the daemons, where each process wakes with cold caches
//! after 50 ms asleep beside fifteen others; set side by side, the two say
//! how much of the path is work and how much is waking.
//!
//! Every eighth write runs cold: before each side's steps a sweep over a
//! buffer larger than the last-level cache evicts code, data and TLB
//! entries, as a daemon finds them after its sleep; the others run warm.
//! Beside the times, the heap allocations of each step: a count that no
//! machine noise moves, and each one is memory a cold process touches.
//!
//! `cargo bench --bench hotpath` (no root needed).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gwsync::control::{Request, change_line, parse_request};
use gwsync::crypto::{GroupKey, keyring_of};
use gwsync::driver::{ChangeEvent, compact_json};
use gwsync::engine::{Config, Engine, Event};
use gwsync::proto::NodeId;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Counts heap allocations, so each step can say how many it makes.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// As the namespace bench: writes 50 ms apart, cycling over 1,000 keys so
/// the store stays the size it reaches there. Every `COLD_EVERY`th write
/// runs cold.
const WRITES: u64 = 8_000;
const COLD_EVERY: u64 = 8;
const KEYS: u64 = 1_000;
const GAP_MS: u64 = 50;

/// Larger than this machine's last-level cache (32 MiB) and than any
/// router's; sweeping it also walks 16,384 pages, past every TLB.
const SWEEP_BYTES: usize = 64 << 20;

const STEPS: [&str; 5] = [
    "writer: parse the set request",
    "writer: compact the value",
    "writer: write, build and seal the push",
    "receiver: open and apply the push, the change event",
    "receiver: the watcher's line",
];

/// Time and allocations of one step.
struct Step {
    started: Instant,
    allocations: u64,
}

impl Step {
    fn start() -> Step {
        Step {
            allocations: ALLOCATIONS.load(Ordering::Relaxed),
            started: Instant::now(),
        }
    }

    fn end(self) -> (Duration, u64) {
        let elapsed = self.started.elapsed();
        (
            elapsed,
            ALLOCATIONS.load(Ordering::Relaxed) - self.allocations,
        )
    }
}

/// Evicts the caller's code and data from every cache level and TLB, as
/// other processes do while a daemon sleeps.
fn sweep(buffer: &mut [u8]) {
    for line in buffer.chunks_mut(64) {
        line[0] = line[0].wrapping_add(1);
    }
    std::hint::black_box(&buffer);
}

fn median(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e6
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
    let mut sweep_buffer = vec![0u8; SWEEP_BYTES];
    // [warm, cold] samples per step.
    let mut times: [[Vec<Duration>; 2]; 5] = Default::default();
    let mut allocations = [0u64; 5];
    let mut datagrams = 0;
    for write in 0..WRITES {
        let cold = write % COLD_EVERY == COLD_EVERY - 1;
        let now = 1_000 + write * GAP_MS;
        let wall_ms = wall_start_ms + now;
        let line = format!(
            r#"{{"op":"set","key":"bench/lossless/{}","value":{{"n": {write}}}}}"#,
            write % KEYS
        );
        if cold {
            sweep(&mut sweep_buffer);
        }
        let step = Step::start();
        let Ok(Request::Set { key, value }) = parse_request(line.as_bytes()) else {
            panic!("not a set: {line}");
        };
        let parse = step.end();
        let step = Step::start();
        let compact = compact_json(&value).expect("valid JSON");
        let compact_step = step.end();
        let step = Step::start();
        writer.set_wall_clock(now, wall_ms);
        writer
            .set(now, wall_ms, &key, compact.as_bytes())
            .expect("write");
        if writer.poll_timeout() <= now {
            writer.handle_timeout(now);
        }
        let pushed: Vec<Vec<u8>> = std::iter::from_fn(|| writer.poll_transmit()).collect();
        while writer.poll_event().is_some() {}
        let write_and_seal = step.end();
        if cold {
            sweep(&mut sweep_buffer);
        }
        let step = Step::start();
        receiver.set_wall_clock(now, wall_ms);
        for datagram in &pushed {
            receiver.handle_datagram(now, datagram);
        }
        if receiver.poll_timeout() <= now {
            receiver.handle_timeout(now);
        }
        while receiver.poll_transmit().is_some() {}
        let changes: Vec<ChangeEvent> = std::iter::from_fn(|| receiver.poll_event())
            .filter_map(|event| match event {
                Event::Changed { key, value, origin } => Some(ChangeEvent::new(key, value, origin)),
                _ => None,
            })
            .collect();
        let receive = step.end();
        assert_eq!(changes.len(), 1, "write {write}: the receiver applies it");
        let step = Step::start();
        let line = change_line(&changes[0]);
        let watcher_line = step.end();
        assert!(line.contains(&key), "{line}");
        datagrams += pushed.len();
        for (index, (elapsed, allocated)) in
            [parse, compact_step, write_and_seal, receive, watcher_line]
                .into_iter()
                .enumerate()
        {
            times[index][usize::from(cold)].push(elapsed);
            allocations[index] += allocated;
        }
    }
    println!("| step | warm us | cold us | allocations |");
    println!("|---|---|---|---|");
    for (index, name) in STEPS.iter().enumerate() {
        let [warm, cold] = &mut times[index];
        println!(
            "| {name} | {:.2} | {:.2} | {:.1} |",
            median(warm),
            median(cold),
            allocations[index] as f64 / WRITES as f64
        );
    }
    println!(
        "(medians of {} warm and {} cold writes over {KEYS} keys, {:.2} datagrams per write, keyed)",
        WRITES - WRITES / COLD_EVERY,
        WRITES / COLD_EVERY,
        datagrams as f64 / WRITES as f64
    );
}
