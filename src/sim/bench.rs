//! The simulator benchmark: gwsync against the bare method, in message
//! counts and virtual time, deterministic for a given plan. The `simbench`
//! example prints it; a test checks a small plan against a committed
//! snapshot (`bench/simbench-snapshot.txt`), so a change in any figure shows
//! up in review.
//!
//! Per row (system, n, loss):
//! - datagrams/bytes per update: one single-key write into a settled group
//!   of 10 entries, counted until the group holds it everywhere and is back
//!   to its periodic rhythm, minus the periodic traffic of that time;
//! - convergence p50/p99: virtual ms from the write until every gateway
//!   holds it (over seeds x updates);
//! - stream: one gateway writes a new key every 100 ms, 50 times (a busy
//!   device mirrored to the group; the namespace bench writes so too):
//!   convergence p99 per write and datagrams per write, so a gateway that
//!   lost an update can learn of it from the writes that follow;
//! - steady datagrams per Imax interval for the whole group;
//! - join: a fresh gateway joins a group holding `join_keys` keys (about
//!   100 bytes each): bytes sent by everyone until it holds everything,
//!   divided by the store size, and the time it took;
//! - partition: two halves write different keys while apart, then heal:
//!   how many of the writes survive.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rand::Rng;

use super::{BareMethod, Factory, Gateway, Medium, Sim, engine_factory};
use crate::engine::Config;

/// What to run. Every figure is a pure function of the plan.
#[derive(Clone, Debug)]
pub struct Plan {
    pub ns: Vec<usize>,
    pub losses: Vec<u32>,
    /// Mean length of a loss burst at each gateway (see
    /// [`Medium::loss_burst_ms`]); 0 loses each datagram on its own.
    pub loss_burst_ms: u64,
    /// Seeds `0..seeds` for the update figures.
    pub seeds: u64,
    pub updates_per_seed: usize,
    /// Keys in the store a joining gateway fetches (10,000: about 1 MB).
    /// 0 skips the join figures.
    pub join_keys: usize,
    pub partition_writes: usize,
    /// gwsync and the bare method, side by side in every table.
    pub systems: Vec<System>,
    pub config: Config,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            ns: vec![3, 8, 32, 128],
            losses: vec![0, 10, 30],
            loss_burst_ms: 0,
            // 500 updates per row: the p99 is then the 5th slowest, where
            // with 50 it was the slowest, one update in 50 that moved from
            // 40 ms to 7 s with the seeds drawn. Updates are cheap to
            // simulate (the joins are most of the run).
            seeds: 10,
            updates_per_seed: 50,
            join_keys: 10_000,
            partition_writes: 20,
            systems: vec![System::Gwsync, System::Bare],
            config: Config::default(),
        }
    }
}

impl Plan {
    /// Small enough for the test suite in a debug build, large enough to
    /// show loss, suppression and joins.
    pub fn snapshot() -> Plan {
        Plan {
            ns: vec![3, 16],
            losses: vec![0, 10, 30],
            loss_burst_ms: 0,
            seeds: 1,
            updates_per_seed: 3,
            join_keys: 300,
            partition_writes: 6,
            systems: vec![System::Gwsync, System::Bare],
            config: Config::default(),
        }
    }
}

const LIMIT_MS: u64 = 60 * 60_000;

/// How long a join may take before it counts as never converging. The bare
/// method at 10 % loss needs every one of ~800 datagrams of one transfer.
const JOIN_LIMIT_MS: u64 = 10 * 60_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    Gwsync,
    Bare,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Gwsync => "gwsync",
            System::Bare => "bare-method",
        }
    }

    fn factory(self, config: &Config) -> Factory {
        match self {
            System::Gwsync => engine_factory(config.clone()),
            // The bare method's random request interval is set to gwsync's
            // Imax, so both spend the same idle budget per gateway.
            System::Bare => BareMethod::factory(config.trickle.imax_ms, config.datagram_bytes_max),
        }
    }
}

/// One line of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub system: System,
    pub n: usize,
    pub loss: u32,
    pub k: u32,
    pub datagrams_per_update: f64,
    pub bytes_per_update: f64,
    pub converge_ms_p50: u64,
    pub converge_ms_p99: u64,
    pub stream_converge_ms_p99: u64,
    pub stream_datagrams_per_write: f64,
    pub steady_datagrams_per_interval: f64,
    /// `None`: not simulated (see [`row_jobs`]).
    pub join_bytes_ratio: Option<f64>,
    /// `None`: some join did not converge within `JOIN_LIMIT_MS`.
    pub join_converge_ms: Option<u64>,
    /// `None` under loss (measured on a clean LAN only).
    pub partition_writes_kept: Option<usize>,
    pub partition_writes: usize,
    pub seeds: u64,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn holds_everywhere(sim: &Sim, key: &str, value: &[u8]) -> bool {
    (0..sim.len()).all(|node| sim.gateway(node).is_some_and(|g| g.holds(key, value)))
}

/// Checked after every event: the cheap necessary conditions go first, so
/// the data is compared in full only when it can be equal.
fn holds_exactly(gateway: &dyn Gateway, expected: &BTreeMap<String, Vec<u8>>) -> bool {
    gateway.live_len() == expected.len() && &gateway.data() == expected
}

fn all_equal(sim: &Sim, expected: &BTreeMap<String, Vec<u8>>) -> bool {
    sim.converged()
        && (0..sim.len()).all(|node| {
            sim.gateway(node)
                .is_some_and(|g| holds_exactly(g, expected))
        })
}

struct UpdateFigures {
    datagrams: Vec<f64>,
    bytes: Vec<f64>,
    converge_ms: Vec<u64>,
    steady_per_interval: f64,
}

fn medium(plan: &Plan, loss: u32) -> Medium {
    Medium {
        loss_percent: loss,
        loss_burst_ms: plan.loss_burst_ms,
        ..Medium::default()
    }
}

fn measure_updates(plan: &Plan, system: System, n: usize, loss: u32, seed: u64) -> UpdateFigures {
    let config = &plan.config;
    let imax = config.trickle.imax_ms;
    let mut sim = Sim::new(seed, n, medium(plan, loss), system.factory(config));
    for i in 0..10 {
        sim.write(
            i % n,
            &format!("room/{i}"),
            Some(b"{\"name\":\"room\",\"lights\":null}"),
        );
    }
    sim.run_for(20 * imax);
    // The periodic rate, measured on this very group.
    let before = sim.traffic();
    sim.run_for(10 * imax);
    let steady = sim.traffic();
    let steady_datagrams_per_ms = (steady.datagrams - before.datagrams) as f64 / (10 * imax) as f64;
    let steady_bytes_per_ms = (steady.bytes - before.bytes) as f64 / (10 * imax) as f64;

    let mut figures = UpdateFigures {
        datagrams: Vec::new(),
        bytes: Vec::new(),
        converge_ms: Vec::new(),
        steady_per_interval: steady_datagrams_per_ms * imax as f64,
    };
    for update in 0..plan.updates_per_seed {
        let writer = sim.rng().random_range(0..n);
        let key = format!("room/{}", update % 10);
        let value = format!("{{\"name\":\"room\",\"lights\":{update}}}");
        let start = sim.traffic();
        sim.write(writer, &key, Some(value.as_bytes()));
        let converge = sim.run_until_condition(LIMIT_MS, |sim| {
            holds_everywhere(sim, &key, value.as_bytes())
        });
        let settle = sim.run_until_condition(LIMIT_MS, Sim::settled);
        let (Some(converge), Some(settle)) = (converge, settle) else {
            panic!(
                "{} n={n} loss={loss} seed={seed}: update {update} did not settle",
                system.name()
            );
        };
        let elapsed = (converge + settle) as f64;
        let end = sim.traffic();
        figures.converge_ms.push(converge);
        figures.datagrams.push(
            ((end.datagrams - start.datagrams) as f64 - steady_datagrams_per_ms * elapsed).max(0.0),
        );
        figures
            .bytes
            .push(((end.bytes - start.bytes) as f64 - steady_bytes_per_ms * elapsed).max(0.0));
        sim.run_for(imax);
    }
    figures
}

/// Writes in the stream, and the gap between two.
const STREAM_WRITES: usize = 50;
const STREAM_GAP_MS: u64 = 100;

struct StreamFigures {
    converge_ms: Vec<u64>,
    datagrams_per_write: f64,
}

/// Gateway 0 of a settled group writes a new key every `STREAM_GAP_MS`;
/// per write, the virtual ms until every gateway holds it.
fn measure_stream(plan: &Plan, system: System, n: usize, loss: u32, seed: u64) -> StreamFigures {
    let imax = plan.config.trickle.imax_ms;
    let mut sim = Sim::new(seed, n, Medium::default(), system.factory(&plan.config));
    for i in 0..10 {
        sim.write(i % n, &format!("room/{i}"), Some(b"{\"name\":\"room\"}"));
    }
    sim.run_for(20 * imax);
    let before = sim.traffic();
    sim.run_for(10 * imax);
    let steady_per_ms = (sim.traffic().datagrams - before.datagrams) as f64 / (10 * imax) as f64;
    sim.set_medium(medium(plan, loss));
    let start = sim.now();
    let before = sim.traffic();
    let mut pending: Vec<(String, Vec<u8>, u64)> = Vec::new();
    let mut converge_ms = Vec::new();
    let mut written = 0;
    while written < STREAM_WRITES || !pending.is_empty() {
        let next_write_at = start + written as u64 * STREAM_GAP_MS;
        if written < STREAM_WRITES && sim.now() >= next_write_at {
            let key = format!("stream/{written}");
            let value = format!("{{\"n\":{written}}}").into_bytes();
            sim.write(0, &key, Some(&value));
            pending.push((key, value, sim.now()));
            written += 1;
            continue;
        }
        let limit = if written < STREAM_WRITES {
            next_write_at - sim.now()
        } else {
            LIMIT_MS
        };
        let some_held = sim.run_until_condition(limit, |sim| {
            pending
                .iter()
                .any(|(key, value, _)| holds_everywhere(sim, key, value))
        });
        if some_held.is_none() && written == STREAM_WRITES {
            panic!(
                "{} n={n} loss={loss} seed={seed}: a stream write did not converge",
                system.name()
            );
        }
        let now = sim.now();
        pending.retain(|(key, value, at)| {
            let held = holds_everywhere(&sim, key, value);
            if held {
                converge_ms.push(now - at);
            }
            !held
        });
    }
    sim.run_until_condition(LIMIT_MS, Sim::settled)
        .unwrap_or_else(|| panic!("{} n={n} seed={seed}: stream did not settle", system.name()));
    let elapsed = (sim.now() - start) as f64;
    let datagrams = (sim.traffic().datagrams - before.datagrams) as f64 - steady_per_ms * elapsed;
    StreamFigures {
        converge_ms,
        datagrams_per_write: datagrams.max(0.0) / STREAM_WRITES as f64,
    }
}

/// Returns (bytes sent by everyone / store bytes, virtual ms to converge);
/// the time is `None` when the joiner had not converged by the limit.
fn measure_join(plan: &Plan, system: System, n: usize, loss: u32, seed: u64) -> (f64, Option<u64>) {
    // The group is built on a clean LAN: the figure is the join, and
    // spreading 10,000 keys to 127 gateways through 10 % loss is most of an
    // hour of simulation that it does not measure.
    let mut sim = Sim::new(seed, n - 1, Medium::default(), system.factory(&plan.config));
    let mut expected = BTreeMap::new();
    let mut store_bytes = 0;
    // One gateway writes the whole set, so both systems start from one
    // agreed data set.
    for i in 0..plan.join_keys {
        let key = format!("home/{}/device/{i}", i % 7);
        let value = format!(
            "{{\"name\":\"device {i}\",\"label\":\"living room lamp\",\"room\":{},\"on\":false,\"level\":{}}}",
            i % 31,
            i % 100
        );
        store_bytes += key.len() + value.len();
        sim.write(0, &key, Some(value.as_bytes()));
        expected.insert(key, value.into_bytes());
    }
    sim.run_until_condition(LIMIT_MS, |sim| all_equal(sim, &expected))
        .unwrap_or_else(|| panic!("{} n={n} seed={seed}: store did not spread", system.name()));
    // Back to the periodic rhythm before the joiner arrives. Waiting for it
    // (rather than a fixed time) spares the bare method, which is always at
    // its rhythm, minutes of re-sending the whole set.
    sim.run_until_condition(LIMIT_MS, Sim::settled)
        .unwrap_or_else(|| panic!("{} n={n} seed={seed}: did not settle", system.name()));
    sim.set_medium(medium(plan, loss));
    let before = sim.traffic();
    let joiner = sim.add_node();
    sim.trigger(joiner);
    let took = sim.run_until_condition(JOIN_LIMIT_MS, |sim| {
        sim.gateway(joiner)
            .is_some_and(|g| holds_exactly(g, &expected))
    });
    let bytes = sim.traffic().bytes - before.bytes;
    (bytes as f64 / store_bytes as f64, took)
}

/// Two halves write different keys while apart; returns how many of the
/// writes every gateway holds after the heal.
fn measure_partition(plan: &Plan, system: System, n: usize, seed: u64) -> usize {
    let config = &plan.config;
    let mut sim = Sim::new(seed, n, Medium::default(), system.factory(config));
    sim.run_for(config.trickle.imax_ms);
    for node in 0..n {
        sim.set_partition(node, (node % 2) as u32 + 1);
    }
    let mut written = Vec::new();
    for i in 0..plan.partition_writes {
        let key = format!("scene/{i}");
        sim.write(i % n, &key, Some(b"{\"on\":true}"));
        written.push(key);
        sim.run_for(1_000);
    }
    sim.heal();
    sim.run_for(20 * config.trickle.imax_ms);
    written
        .iter()
        .filter(|key| {
            (0..n).all(|node| {
                sim.gateway(node)
                    .is_some_and(|g| g.data().contains_key(key.as_str()))
            })
        })
        .count()
}

/// One independent simulation of a row; a row's jobs run on any thread
/// and are combined in a fixed order, so the figures do not depend on the
/// number of threads.
#[derive(Clone, Copy)]
enum Job {
    Updates { seed: u64 },
    Stream { seed: u64 },
    Join,
    Partition,
}

enum Outcome {
    Updates(UpdateFigures),
    Stream(StreamFigures),
    Join((f64, Option<u64>)),
    Partition(usize),
}

/// (system, n, loss) of one table line.
type RowKey = (System, usize, u32);

fn row_jobs(plan: &Plan, (system, n, loss): RowKey) -> Vec<Job> {
    let mut jobs: Vec<Job> = (0..plan.seeds).map(|seed| Job::Updates { seed }).collect();
    jobs.extend((0..plan.seeds).map(|seed| Job::Stream { seed }));
    // One join per row: a join is a thousand-datagram transfer whose figure
    // moves little from seed to seed.
    // The bare method at N >= 32 under loss re-sends the whole set from
    // every gateway every interval without ever completing a transfer:
    // about 10^8 simulated deliveries per minute at N = 128, and at N = 32
    // over 13 GB of simulator memory before the join ends.
    let bare_lossy_join_too_slow =
        system == System::Bare && loss > 0 && n * plan.join_keys >= 32 * 10_000;
    if !bare_lossy_join_too_slow && plan.join_keys > 0 {
        jobs.push(Job::Join);
    }
    if loss == 0 && plan.partition_writes > 0 {
        jobs.push(Job::Partition);
    }
    jobs
}

fn run_job(plan: &Plan, (system, n, loss): RowKey, job: Job) -> Outcome {
    match job {
        Job::Updates { seed } => Outcome::Updates(measure_updates(plan, system, n, loss, seed)),
        Job::Stream { seed } => Outcome::Stream(measure_stream(plan, system, n, loss, seed)),
        Job::Join => Outcome::Join(measure_join(plan, system, n, loss, 0)),
        Job::Partition => Outcome::Partition(measure_partition(plan, system, n, 0)),
    }
}

/// Combines a row's outcomes, given in the order of [`row_jobs`].
fn row_from(plan: &Plan, (system, n, loss): RowKey, outcomes: Vec<Outcome>) -> Row {
    let mut datagrams = Vec::new();
    let mut bytes = Vec::new();
    let mut converge = Vec::new();
    let mut steady = Vec::new();
    let mut stream_converge = Vec::new();
    let mut stream_datagrams = Vec::new();
    let mut joins = Vec::new();
    let mut partition_writes_kept = None;
    for outcome in outcomes {
        match outcome {
            Outcome::Updates(figures) => {
                datagrams.extend(figures.datagrams);
                bytes.extend(figures.bytes);
                converge.extend(figures.converge_ms);
                steady.push(figures.steady_per_interval);
            }
            Outcome::Stream(figures) => {
                stream_converge.extend(figures.converge_ms);
                stream_datagrams.push(figures.datagrams_per_write);
            }
            Outcome::Join(join) => joins.push(join),
            Outcome::Partition(kept) => partition_writes_kept = Some(kept),
        }
    }
    converge.sort_unstable();
    stream_converge.sort_unstable();
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len().max(1) as f64;
    Row {
        system,
        n,
        loss,
        k: plan.config.trickle.k,
        datagrams_per_update: mean(&datagrams),
        bytes_per_update: mean(&bytes),
        converge_ms_p50: percentile(&converge, 50.0),
        converge_ms_p99: percentile(&converge, 99.0),
        stream_converge_ms_p99: percentile(&stream_converge, 99.0),
        stream_datagrams_per_write: mean(&stream_datagrams),
        steady_datagrams_per_interval: mean(&steady),
        join_bytes_ratio: (!joins.is_empty())
            .then(|| mean(&joins.iter().map(|j| j.0).collect::<Vec<_>>())),
        join_converge_ms: joins
            .iter()
            .map(|j| j.1)
            .collect::<Option<Vec<u64>>>()
            .map(|t| t.into_iter().max().unwrap_or(0)),
        partition_writes_kept,
        partition_writes: plan.partition_writes,
        seeds: plan.seeds,
    }
}

/// Every row of the plan, gwsync and the bare method side by side, in
/// table order; `each` sees each row as soon as it and every row before it
/// are measured. The simulations run on all available cores (a full run is
/// hours of simulated LAN on one core), the largest first so that no core
/// is left with one long job at the end.
pub fn run(plan: &Plan, mut each: impl FnMut(&Row)) -> Vec<Row> {
    let keys: Vec<RowKey> = plan
        .ns
        .iter()
        .flat_map(|&n| {
            plan.losses
                .iter()
                .flat_map(move |&loss| plan.systems.iter().map(move |&system| (system, n, loss)))
        })
        .collect();
    let mut jobs: Vec<(usize, usize, Job)> = keys
        .iter()
        .enumerate()
        .flat_map(|(row, &key)| {
            row_jobs(plan, key)
                .into_iter()
                .enumerate()
                .map(move |(index, job)| (row, index, job))
        })
        .collect();
    let cost = |&(row, _, job): &(usize, usize, Job)| {
        let (_, n, _) = keys[row];
        match job {
            Job::Join => n * plan.join_keys.max(1) / 100,
            _ => n,
        }
    };
    jobs.sort_by_key(|job| std::cmp::Reverse(cost(job)));
    let mut outcomes: Vec<Vec<Option<Outcome>>> = keys
        .iter()
        .map(|&key| row_jobs(plan, key).iter().map(|_| None).collect())
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next_job = std::sync::atomic::AtomicUsize::new(0);
    let mut rows = Vec::with_capacity(keys.len());
    std::thread::scope(|scope| {
        let (sender, receiver) = std::sync::mpsc::channel();
        for _ in 0..threads.min(jobs.len()) {
            let sender = sender.clone();
            let (jobs, keys, next_job) = (&jobs, &keys, &next_job);
            scope.spawn(move || {
                while let Some(&(row, index, job)) =
                    jobs.get(next_job.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    if sender
                        .send((row, index, run_job(plan, keys[row], job)))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        drop(sender);
        let mut emit_complete_rows = |outcomes: &mut Vec<Vec<Option<Outcome>>>| {
            while rows.len() < keys.len() && outcomes[rows.len()].iter().all(Option::is_some) {
                let done = rows.len();
                let complete = std::mem::take(&mut outcomes[done]);
                let row = row_from(plan, keys[done], complete.into_iter().flatten().collect());
                each(&row);
                rows.push(row);
            }
        };
        // A row with nothing to simulate is complete before any job ends.
        emit_complete_rows(&mut outcomes);
        for (row, index, outcome) in receiver {
            outcomes[row][index] = Some(outcome);
            emit_complete_rows(&mut outcomes);
        }
    });
    rows
}

pub const TABLE_HEADER: &str = "system          n loss%  k dgrams/upd  bytes/upd conv_p50 conv_p99 strm_p99 dgrams/wr  steady/I   join_x   join_ms part_kept seeds";

impl Row {
    /// The row as a line of the text table under [`TABLE_HEADER`].
    pub fn table_line(&self) -> String {
        let kept = match self.partition_writes_kept {
            Some(kept) => format!("{kept}/{}", self.partition_writes),
            None => "-".into(),
        };
        let (join_x, join_ms) = match self.join_bytes_ratio {
            None => ("-".to_owned(), "-".to_owned()),
            Some(ratio) => (
                format!("{ratio:.2}"),
                self.join_converge_ms
                    .map_or("never".into(), |ms| ms.to_string()),
            ),
        };
        format!(
            "{:<12} {:>4} {:>5} {:>2} {:>10.2} {:>10.0} {:>8} {:>8} {:>8} {:>9.2} {:>9.2} {:>8} {:>9} {:>9} {:>5}",
            self.system.name(),
            self.n,
            self.loss,
            self.k,
            self.datagrams_per_update,
            self.bytes_per_update,
            self.converge_ms_p50,
            self.converge_ms_p99,
            self.stream_converge_ms_p99,
            self.stream_datagrams_per_write,
            self.steady_datagrams_per_interval,
            join_x,
            join_ms,
            kept,
            self.seeds
        )
    }

    /// The row as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "system": self.system.name(), "n": self.n, "loss": self.loss, "k": self.k,
            "datagrams_per_update": self.datagrams_per_update,
            "bytes_per_update": self.bytes_per_update,
            "converge_ms_p50": self.converge_ms_p50, "converge_ms_p99": self.converge_ms_p99,
            "stream_converge_ms_p99": self.stream_converge_ms_p99,
            "stream_datagrams_per_write": self.stream_datagrams_per_write,
            "steady_datagrams_per_interval": self.steady_datagrams_per_interval,
            "join_bytes_ratio": self.join_bytes_ratio, "join_converge_ms": self.join_converge_ms,
            "partition_writes_kept": self.partition_writes_kept,
            "partition_writes": self.partition_writes,
            "seeds": self.seeds,
        })
    }
}

/// The whole table as text.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{TABLE_HEADER}");
    for row in rows {
        let _ = writeln!(out, "{}", row.table_line());
    }
    out
}
