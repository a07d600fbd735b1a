//! Simulator benchmark: gwsync against the bare method, in message counts
//! and virtual time, deterministic for a given seed.
//!
//!     cargo run --release --example simbench            # table
//!     cargo run --release --example simbench -- --json  # one JSON object per row
//!     cargo run --release --example simbench -- --seeds 10 --n 3,8
//!
//! Per row (system, n, loss):
//! - datagrams/bytes per update: one single-key write into a settled group
//!   of 10 entries, counted until the group holds it everywhere and is back
//!   to its periodic rhythm, minus the periodic traffic of that time;
//! - convergence p50/p99: virtual ms from the write until every gateway
//!   holds it (over seeds x updates);
//! - steady datagrams per Imax interval for the whole group;
//! - join: a fresh gateway joins a group holding 10,000 keys (about 1 MB):
//!   bytes sent by everyone until it holds everything, divided by the store
//!   size, and the time it took;
//! - partition: two halves write different keys while apart, then heal:
//!   how many of the writes survive.

use std::collections::BTreeMap;

use gwsync::engine::Config;
use gwsync::sim::{BareMethod, Factory, Medium, Sim, engine_factory};
use rand::Rng;

const UPDATES_PER_SEED: usize = 5;
const JOIN_KEYS: usize = 10_000;
const PARTITION_WRITES: usize = 20;
const LIMIT_MS: u64 = 60 * 60_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    Gwsync,
    Bare,
}

impl System {
    fn name(self) -> &'static str {
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

struct Row {
    system: System,
    n: usize,
    loss: u32,
    k: u32,
    datagrams_per_update: f64,
    bytes_per_update: f64,
    converge_ms_p50: u64,
    converge_ms_p99: u64,
    steady_datagrams_per_interval: f64,
    /// `None`: not simulated (see `run_row`).
    join_bytes_ratio: Option<f64>,
    /// `None`: some join did not converge within `JOIN_LIMIT_MS`.
    join_converge_ms: Option<u64>,
    partition_writes_kept: usize,
    seeds: u64,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn holds_everywhere(sim: &Sim, key: &str, value: &[u8]) -> bool {
    (0..sim.len()).all(|node| {
        sim.gateway(node)
            .is_some_and(|g| g.data().get(key).map(Vec::as_slice) == Some(value))
    })
}

fn all_equal(sim: &Sim, expected: &BTreeMap<String, Vec<u8>>) -> bool {
    (0..sim.len()).all(|node| sim.gateway(node).is_some_and(|g| &g.data() == expected))
}

struct UpdateFigures {
    datagrams: Vec<f64>,
    bytes: Vec<f64>,
    converge_ms: Vec<u64>,
    steady_per_interval: f64,
}

fn measure_updates(
    system: System,
    config: &Config,
    n: usize,
    loss: u32,
    seed: u64,
) -> UpdateFigures {
    let medium = Medium {
        loss_percent: loss,
        ..Medium::default()
    };
    let imax = config.trickle.imax_ms;
    let mut sim = Sim::new(seed, n, medium, system.factory(config));
    for i in 0..10 {
        sim.write(
            i % n,
            &format!("room/{i}"),
            Some(b"{\"name\":\"room\",\"lights\":3}"),
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
    for update in 0..UPDATES_PER_SEED {
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

/// How long a join may take before it counts as never converging. The bare
/// method at 10 % loss needs every one of ~800 datagrams of one transfer.
const JOIN_LIMIT_MS: u64 = 10 * 60_000;

/// Returns (bytes sent by everyone / store bytes, virtual ms to converge);
/// the time is `None` when the joiner had not converged by the limit.
fn measure_join(
    system: System,
    config: &Config,
    n: usize,
    loss: u32,
    seed: u64,
) -> (f64, Option<u64>) {
    let medium = Medium {
        loss_percent: loss,
        ..Medium::default()
    };
    let mut sim = Sim::new(seed, n - 1, medium, system.factory(config));
    let mut expected = BTreeMap::new();
    let mut store_bytes = 0;
    // One gateway writes the whole set, so both systems start from one
    // agreed data set.
    for i in 0..JOIN_KEYS {
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
    sim.run_for(20 * config.trickle.imax_ms);
    let before = sim.traffic();
    let joiner = sim.add_node();
    sim.trigger(joiner);
    let took = sim.run_until_condition(JOIN_LIMIT_MS, |sim| {
        sim.gateway(joiner).is_some_and(|g| g.data() == expected)
    });
    let bytes = sim.traffic().bytes - before.bytes;
    (bytes as f64 / store_bytes as f64, took)
}

/// Two halves write different keys while apart; returns how many of the
/// writes every gateway holds after the heal.
fn measure_partition(system: System, config: &Config, n: usize, seed: u64) -> usize {
    let mut sim = Sim::new(seed, n, Medium::default(), system.factory(config));
    sim.run_for(config.trickle.imax_ms);
    for node in 0..n {
        sim.set_partition(node, (node % 2) as u32 + 1);
    }
    let mut written = Vec::new();
    for i in 0..PARTITION_WRITES {
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

fn run_row(system: System, config: &Config, n: usize, loss: u32, seeds: u64) -> Row {
    let mut datagrams = Vec::new();
    let mut bytes = Vec::new();
    let mut converge = Vec::new();
    let mut steady = Vec::new();
    for seed in 0..seeds {
        let figures = measure_updates(system, config, n, loss, seed);
        datagrams.extend(figures.datagrams);
        bytes.extend(figures.bytes);
        converge.extend(figures.converge_ms);
        steady.push(figures.steady_per_interval);
    }
    converge.sort_unstable();
    let join_seeds = if n >= 128 { 1 } else { seeds.min(2) };
    // The bare method at N = 128 under loss re-sends the whole 1 MB set from
    // every gateway every interval: about 10^8 simulated deliveries per
    // minute, too slow to simulate; its N = 32 row already shows the trend.
    let join_seeds = if system == System::Bare && n >= 128 && loss > 0 {
        0
    } else {
        join_seeds
    };
    let joins: Vec<(f64, Option<u64>)> = (0..join_seeds)
        .map(|seed| measure_join(system, config, n, loss, seed))
        .collect();
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len().max(1) as f64;
    Row {
        system,
        n,
        loss,
        k: config.trickle.k,
        datagrams_per_update: mean(&datagrams),
        bytes_per_update: mean(&bytes),
        converge_ms_p50: percentile(&converge, 50.0),
        converge_ms_p99: percentile(&converge, 99.0),
        steady_datagrams_per_interval: mean(&steady),
        join_bytes_ratio: (!joins.is_empty())
            .then(|| mean(&joins.iter().map(|j| j.0).collect::<Vec<_>>())),
        join_converge_ms: joins
            .iter()
            .map(|j| j.1)
            .collect::<Option<Vec<u64>>>()
            .map(|t| t.into_iter().max().unwrap_or(0)),
        partition_writes_kept: if loss == 0 {
            measure_partition(system, config, n, 0)
        } else {
            0
        },
        seeds,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let option = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let seeds: u64 = option("--seeds").map_or(5, |s| s.parse().expect("--seeds takes a number"));
    let ns: Vec<usize> = option("--n").map_or(vec![3, 8, 32, 128], |s| {
        s.split(',')
            .map(|n| n.parse().expect("--n takes numbers"))
            .collect()
    });
    let config = Config::default();
    if !json {
        println!(
            "{:<12} {:>4} {:>5} {:>2} {:>10} {:>10} {:>8} {:>8} {:>9} {:>8} {:>9} {:>9} {:>5}",
            "system",
            "n",
            "loss%",
            "k",
            "dgrams/upd",
            "bytes/upd",
            "conv_p50",
            "conv_p99",
            "steady/I",
            "join_x",
            "join_ms",
            "part_kept",
            "seeds"
        );
    }
    for &n in &ns {
        for loss in [0, 10] {
            for system in [System::Gwsync, System::Bare] {
                let row = run_row(system, &config, n, loss, seeds);
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "system": row.system.name(), "n": row.n, "loss": row.loss, "k": row.k,
                            "datagrams_per_update": row.datagrams_per_update,
                            "bytes_per_update": row.bytes_per_update,
                            "converge_ms_p50": row.converge_ms_p50, "converge_ms_p99": row.converge_ms_p99,
                            "steady_datagrams_per_interval": row.steady_datagrams_per_interval,
                            "join_bytes_ratio": row.join_bytes_ratio, "join_converge_ms": row.join_converge_ms,
                            "partition_writes_kept": if row.loss == 0 { Some(row.partition_writes_kept) } else { None },
                            "partition_writes": PARTITION_WRITES,
                            "seeds": row.seeds,
                        })
                    );
                } else {
                    let kept = if loss == 0 {
                        format!("{}/{}", row.partition_writes_kept, PARTITION_WRITES)
                    } else {
                        "-".into()
                    };
                    let (join_x, join_ms) = match row.join_bytes_ratio {
                        None => ("-".to_owned(), "-".to_owned()),
                        Some(ratio) => (
                            format!("{ratio:.2}"),
                            row.join_converge_ms
                                .map_or("never".into(), |ms| ms.to_string()),
                        ),
                    };
                    println!(
                        "{:<12} {:>4} {:>5} {:>2} {:>10.2} {:>10.0} {:>8} {:>8} {:>9.2} {:>8} {:>9} {:>9} {:>5}",
                        row.system.name(),
                        row.n,
                        row.loss,
                        row.k,
                        row.datagrams_per_update,
                        row.bytes_per_update,
                        row.converge_ms_p50,
                        row.converge_ms_p99,
                        row.steady_datagrams_per_interval,
                        join_x,
                        join_ms,
                        kept,
                        row.seeds
                    );
                }
            }
        }
    }
}
