//! Simulator benchmark: gwsync against the bare method, in message counts
//! and virtual time, deterministic for a given seed (the figures are
//! described in `gwsync::sim::bench` and bench/README.md).
//!
//!     cargo run --release --example simbench            # table
//!     cargo run --release --example simbench -- --json  # one JSON object per row
//!     cargo run --release --example simbench -- --seeds 10 --n 3,8 --loss 0,10
//!     cargo run --release --example simbench -- --snapshot  # the plan tests/sim.rs checks
//!     ... --join-keys 0 --partition-writes 0    # update figures only

use std::time::Instant;

use gwsync::sim::bench::{self, Plan, TABLE_HEADER};

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
    if let Some(ns) = list("--n") {
        plan.ns = ns.into_iter().map(|n| n as usize).collect();
    }
    if let Some(losses) = list("--loss") {
        plan.losses = losses.into_iter().map(|l| l as u32).collect();
    }
    if let Some(keys) = option("--join-keys") {
        plan.join_keys = keys.parse().expect("--join-keys takes a number");
    }
    if let Some(writes) = option("--partition-writes") {
        plan.partition_writes = writes.parse().expect("--partition-writes takes a number");
    }
    let started = Instant::now();
    if !json {
        println!("{TABLE_HEADER}");
    }
    bench::run(&plan, |row| {
        if json {
            println!("{}", row.json());
        } else {
            println!("{}", row.table_line());
        }
    });
    eprintln!("simbench: {:.0} s", started.elapsed().as_secs_f64());
}
