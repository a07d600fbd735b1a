//! Simulator benchmark: gwsync against the bare method, in message counts
//! and virtual time, deterministic for a given seed (the figures are
//! described in `gwsync::sim::bench` and bench/README.md).
//!
//!     cargo run --release --example simbench            # table
//!     cargo run --release --example simbench -- --json  # one JSON object per row
//!     cargo run --release --example simbench -- --seeds 10 --n 3,8 --loss 0,10
//!     cargo run --release --example simbench -- --snapshot  # the plan tests/sim.rs checks
//!     ... --join-keys 0 --partition-writes 0    # update figures only
//!     ... --gwsync-only                          # while tuning
//!     ... --loss-burst-ms 20                     # loss in bursts, as on Wi-Fi
//!     ... --left-out-inverse 20                  # fewer copies of a push, a later p99
//!     ... --updates-per-seed 5                   # 50 updates per row, not 500
//!     cargo run --release --example simbench -- --attacks  # attack rows only

use std::time::Instant;

use gwsync::sim::bench::{self, Plan, System, TABLE_HEADER};
use gwsync::sim::byzantine;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let option = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let list = |name: &str| {
        option(name).map(|s| {
            s.split(',')
                .map(|n| n.parse().unwrap_or_else(|_| panic!("{name} takes numbers")))
                .collect::<Vec<u64>>()
        })
    };
    let mut plan = if args.iter().any(|a| a == "--snapshot") {
        Plan::snapshot()
    } else {
        Plan::default()
    };
    if let Some(seeds) = option("--seeds") {
        plan.seeds = seeds.parse().expect("--seeds takes a number");
    }
    if let Some(updates) = option("--updates-per-seed") {
        plan.updates_per_seed = updates.parse().expect("--updates-per-seed takes a number");
    }
    if let Some(ns) = list("--n") {
        plan.ns = ns.into_iter().map(|n| n as usize).collect();
    }
    if let Some(losses) = list("--loss") {
        plan.losses = losses.into_iter().map(|l| l as u32).collect();
    }
    if let Some(burst) = option("--loss-burst-ms") {
        plan.loss_burst_ms = burst.parse().expect("--loss-burst-ms takes a number");
    }
    if let Some(inverse) = option("--left-out-inverse") {
        plan.config.push_left_out_inverse =
            inverse.parse().expect("--left-out-inverse takes a number");
    }
    if let Some(keys) = option("--join-keys") {
        plan.join_keys = keys.parse().expect("--join-keys takes a number");
    }
    if let Some(writes) = option("--partition-writes") {
        plan.partition_writes = writes.parse().expect("--partition-writes takes a number");
    }
    if args.iter().any(|a| a == "--gwsync-only") {
        plan.systems = vec![System::Gwsync];
    }
    let started = Instant::now();
    if args.iter().any(|a| a == "--attacks") {
        attack_rows();
        return;
    }
    if !json {
        if plan.loss_burst_ms > 0 {
            println!(
                "loss in bursts of {} ms on average at each gateway",
                plan.loss_burst_ms
            );
        }
        let default_inverse = gwsync::engine::Config::default().push_left_out_inverse;
        if plan.config.push_left_out_inverse != default_inverse {
            println!(
                "copies of a push leave one update in {} with a gateway that lost them all",
                plan.config.push_left_out_inverse
            );
        }
        println!("{TABLE_HEADER}");
    }
    bench::run(&plan, |row| {
        if json {
            println!("{}", row.json());
        } else {
            println!("{}", row.table_line());
        }
    });
    if !json {
        attack_rows();
    }
    eprintln!("simbench: {:.0} s", started.elapsed().as_secs_f64());
}

/// Hostile peers, kept apart from the table above: what one forged
/// datagram of each type makes a settled group of four (1,000 entries)
/// send within 10 s, beyond what it sends anyway; and how far a forger
/// running for 10 minutes moves the honest clocks.
fn attack_rows() {
    let group = || byzantine::settled_group(11, 4, 1_000);
    println!();
    println!(
        "| attack (one datagram, N = 4, 1,000 entries) | bytes in | bytes out | datagrams out | factor |"
    );
    println!("|---|---|---|---|---|");
    let mut attacks = byzantine::forged_datagrams(&group());
    attacks.push((
        "bucket digests, empty store (join)",
        byzantine::empty_store_digests(1),
    ));
    for (name, datagram) in attacks {
        let answer = byzantine::answer_to(group, |_| datagram.clone(), 10_000);
        println!(
            "| {name} | {} | {} | {} | {:.1}x |",
            answer.bytes_in,
            answer.bytes_out,
            answer.datagrams_out,
            answer.factor()
        );
    }
    let drift = byzantine::clock_drift_under_attack(11, 10 * 60_000);
    println!();
    println!(
        "clock drift after a 10-minute forger attack (largest honest clock ahead of its wall clock): {drift} ms (bound {} ms)",
        gwsync::engine::Config::default().clock_ahead_max_ms
    );
}
