//! The engine under the deterministic simulator: the method's own example,
//! partitions, joins, faults, and many random seeds. Every failure message
//! names its seed; `GWSYNC_SIM_SEED=N cargo test --test sim` replays one.
//! `GWSYNC_SIM_SCALE=P` runs P % of each test's seeds: 1000 for the longer
//! optional run (10,000 random scenarios), less under qemu.

use std::collections::BTreeMap;

use gwsync::engine::store::Entry;
use gwsync::engine::{Config, Engine};
use gwsync::sim::byzantine::{
    Forger, answer_to, answer_to_each, empty_store_digests, forged_datagrams, settled_group,
};
use gwsync::sim::{Medium, Reception, Sim, drive_bounded, engine_factory};
use rand::Rng;

/// Every write made in a run; the expected end state is their
/// last-writer-wins merge.
#[derive(Default)]
struct Oracle {
    winners: BTreeMap<String, Entry>,
}

impl Oracle {
    fn write(&mut self, sim: &mut Sim, node: usize, key: &str, value: Option<&[u8]>) {
        sim.write(node, key, value);
        let Some(entry) = engine(sim, node)
            .store()
            .get(key)
            .map(|entry| entry.to_owned())
        else {
            return;
        };
        let wins = self.winners.get(key).is_none_or(|old| {
            (entry.version, entry.value.as_deref()) > (old.version, old.value.as_deref())
        });
        if wins {
            self.winners.insert(key.to_owned(), entry);
        }
    }

    fn expected(&self) -> BTreeMap<String, Vec<u8>> {
        self.winners
            .iter()
            .filter_map(|(key, entry)| Some((key.clone(), entry.value.as_deref()?.to_vec())))
            .collect()
    }
}

fn engine(sim: &Sim, node: usize) -> &Engine {
    sim.gateway(node)
        .and_then(|gateway| gateway.engine())
        .expect("node is up and runs an engine")
}

fn data(sim: &Sim, node: usize) -> BTreeMap<String, Vec<u8>> {
    sim.gateway(node).expect("node is up").data()
}

/// Runs until the group holds exactly the oracle's data everywhere and is
/// quiet; panics with the seed otherwise.
fn settle(sim: &mut Sim, oracle: &Oracle, seed: u64, limit_ms: u64) -> u64 {
    let expected = oracle.expected();
    let took = sim.run_until_condition(limit_ms, |sim| {
        sim.quiet() && (0..sim.len()).all(|node| !sim.is_up(node) || data(sim, node) == expected)
    });
    match took {
        Some(took) => took,
        None => {
            let report: Vec<String> = (0..sim.len())
                .filter(|&node| sim.is_up(node))
                .map(|node| {
                    let held = data(sim, node);
                    let missing = expected
                        .iter()
                        .filter(|(k, v)| held.get(*k) != Some(v))
                        .count();
                    let extra = held.keys().filter(|k| !expected.contains_key(*k)).count();
                    format!("node {node}: {missing} missing/different, {extra} extra")
                })
                .collect();
            panic!(
                "seed {seed}: no convergence within {limit_ms} ms (quiet: {}): {report:?}",
                sim.quiet()
            )
        }
    }
}

fn new_sim(seed: u64, n: usize, medium: Medium) -> Sim {
    Sim::new(seed, n, medium, engine_factory(Config::default()))
}

fn seeds(default: u64) -> Vec<u64> {
    if let Ok(seed) = std::env::var("GWSYNC_SIM_SEED") {
        return vec![seed.parse().expect("GWSYNC_SIM_SEED is a number")];
    }
    let scale: u64 = std::env::var("GWSYNC_SIM_SCALE")
        .ok()
        .map(|n| n.parse().expect("GWSYNC_SIM_SCALE is a percentage"))
        .unwrap_or(100);
    (0..(default * scale / 100).max(1)).collect()
}

const MINUTE: u64 = 60_000;

#[test]
fn method_example_versions_1_2_3_converge_to_3_and_the_oldest_never_sends_data() {
    for seed in seeds(50) {
        let mut sim = new_sim(seed, 3, Medium::default());
        let mut oracle = Oracle::default();
        for node in 0..3 {
            sim.set_partition(node, node as u32 + 1);
        }
        for (node, version) in [(0, "1"), (1, "2"), (2, "3")] {
            oracle.write(&mut sim, node, "data", Some(version.as_bytes()));
            sim.run_for(1_000);
        }
        // Let each isolated gateway's Trickle timer settle, then join them.
        sim.run_for(5 * MINUTE);
        let oldest_data_sent = |sim: &Sim| {
            let counters = engine(sim, 0).counters();
            counters.pushes_sent + counters.repairs_sent + counters.fragments_sent
        };
        let before = oldest_data_sent(&sim);
        sim.heal();
        sim.trigger(1);
        settle(&mut sim, &oracle, seed, 10 * MINUTE);
        for node in 0..3 {
            assert_eq!(data(&sim, node)["data"], b"3", "seed {seed}");
        }
        assert_eq!(
            oldest_data_sent(&sim),
            before,
            "seed {seed}: gateway 1 sent its older data"
        );
    }
}

#[test]
fn partitioned_writes_to_different_keys_all_survive_the_heal() {
    for seed in seeds(50) {
        let mut sim = new_sim(seed, 6, Medium::default());
        let mut oracle = Oracle::default();
        sim.run_for(MINUTE);
        for node in 0..6 {
            sim.set_partition(node, (node % 2) as u32 + 1);
        }
        for round in 0..10 {
            for node in 0..6 {
                let key = format!("scene/{node}/{round}");
                oracle.write(&mut sim, node, &key, Some(b"{\"on\":true}"));
            }
            sim.run_for(700);
        }
        sim.run_for(2 * MINUTE);
        sim.heal();
        settle(&mut sim, &oracle, seed, 10 * MINUTE);
        assert_eq!(data(&sim, 0).len(), 60, "seed {seed}");
    }
}

#[test]
fn concurrent_writes_to_one_key_give_the_same_winner_everywhere() {
    for seed in seeds(50) {
        let mut sim = new_sim(seed, 4, Medium::default());
        let mut oracle = Oracle::default();
        for node in 0..4 {
            sim.set_partition(node, node as u32);
        }
        for node in 0..4 {
            let value = format!("{{\"by\":{node}}}");
            oracle.write(&mut sim, node, "room/1", Some(value.as_bytes()));
        }
        sim.heal();
        settle(&mut sim, &oracle, seed, 10 * MINUTE);
        let winner = data(&sim, 0)["room/1"].clone();
        for node in 1..4 {
            assert_eq!(data(&sim, node)["room/1"], winner, "seed {seed}");
        }
    }
}

#[test]
fn a_delete_beats_an_older_write_and_loses_to_a_newer_one() {
    for seed in seeds(20) {
        let mut sim = new_sim(seed, 3, Medium::default());
        let mut oracle = Oracle::default();
        oracle.write(&mut sim, 0, "device/7", Some(b"1"));
        settle(&mut sim, &oracle, seed, MINUTE);
        sim.set_partition(2, 9);
        oracle.write(&mut sim, 1, "device/7", None);
        sim.run_for(1_000);
        // Gateway 3 never saw the delete but holds the old value: healing
        // must not bring it back.
        sim.heal();
        settle(&mut sim, &oracle, seed, 10 * MINUTE);
        assert!(!data(&sim, 2).contains_key("device/7"), "seed {seed}");
        sim.run_for(1_000);
        oracle.write(&mut sim, 2, "device/7", Some(b"2"));
        settle(&mut sim, &oracle, seed, 10 * MINUTE);
        assert_eq!(data(&sim, 0)["device/7"], b"2", "seed {seed}");
    }
}

#[test]
fn a_new_gateway_joining_a_10000_key_group_converges_without_everyone_answering() {
    for seed in seeds(2) {
        let mut sim = new_sim(seed, 8, Medium::default());
        let mut oracle = Oracle::default();
        for i in 0..10_000 {
            let key = format!("home/{}/device/{i}", i % 7);
            let value = format!(
                "{{\"name\":\"device {i}\",\"label\":\"living room lamp\",\"room\":{},\"on\":false,\"level\":{}}}",
                i % 31,
                i % 100
            );
            oracle.write(&mut sim, i % 8, &key, Some(value.as_bytes()));
        }
        settle(&mut sim, &oracle, seed, 10 * MINUTE);
        let store_bytes = engine(&sim, 0).store().bytes() as u64;
        assert!(store_bytes > 900_000, "store is {store_bytes} bytes");
        sim.run_for(10 * MINUTE);
        let before = sim.traffic();
        let repairs_before: Vec<u64> = (0..8)
            .map(|node| engine(&sim, node).counters().repairs_sent)
            .collect();
        let joiner = sim.add_node();
        let took = settle(&mut sim, &oracle, seed, 10 * MINUTE);
        let bytes = sim.traffic().bytes - before.bytes;
        let answering: Vec<u64> = (0..8)
            .map(|node| engine(&sim, node).counters().repairs_sent - repairs_before[node])
            .collect();
        let most = *answering.iter().max().unwrap();
        let total: u64 = answering.iter().sum();
        assert_eq!(data(&sim, joiner).len(), 10_000, "seed {seed}");
        assert!(
            bytes * 2 <= store_bytes * 3,
            "seed {seed}: join cost {bytes} bytes for a {store_bytes}-byte store (took {took} ms)"
        );
        assert!(
            most * 10 >= total * 7,
            "seed {seed}: repairs were spread over many gateways: {answering:?}"
        );
    }
}

/// Writes and faults, then convergence to exactly the merge, then quiet.
fn faulty_run(seed: u64, medium: Medium, crash: bool, skew: bool) {
    let mut sim = new_sim(seed, 5, medium);
    let mut oracle = Oracle::default();
    // Skews stay within the clock bound (Config::clock_ahead_max_ms, 5
    // minutes) of each other; clocks days off are in the byzantine tests.
    let minute = 60_000i64;
    if skew {
        sim.set_clock_offset(1, -2 * minute);
        sim.set_clock_offset(2, 2 * minute);
    }
    for round in 0..40u32 {
        let node = (seed as usize + round as usize) % 5;
        if !sim.is_up(node) {
            continue;
        }
        let key = format!("k/{}", round % 7);
        let value = if round % 9 == 8 {
            None
        } else {
            Some(format!("{round}"))
        };
        oracle.write(&mut sim, node, &key, value.as_deref().map(str::as_bytes));
        if crash && round == 17 {
            sim.crash(3);
        }
        if crash && round == 29 {
            sim.restart(3);
        }
        if skew && round == 20 {
            sim.set_clock_offset(2, -2 * minute);
        }
        sim.run_for(37);
    }
    settle(&mut sim, &oracle, seed, 30 * MINUTE);
    // Quiet means back to Trickle's steady state: a few summaries per Imax.
    sim.run_for(5 * MINUTE);
    let before = sim.traffic().datagrams;
    sim.run_for(10 * 64_000);
    let per_interval = (sim.traffic().datagrams - before) as f64 / 10.0;
    assert!(
        per_interval <= 4.0,
        "seed {seed}: {per_interval} datagrams per Imax when quiet"
    );
}

/// Loss in bursts keeps its share of datagrams and comes in stretches of
/// the mean length asked for; without bursts a loss says nothing of the
/// next datagram.
#[test]
fn loss_in_bursts_keeps_its_rate_and_its_mean_burst() {
    const SAMPLES: u64 = 1_000_000;
    // One datagram every `every_ms` (1,000,000 of them): (share lost, mean
    // run of consecutive losses).
    let heard = |loss_burst_ms: u64, every_ms: u64| -> (f64, f64) {
        let medium = Medium {
            loss_percent: 10,
            loss_burst_ms,
            ..Medium::default()
        };
        let mut rng = <gwsync::engine::SeededRng as rand::SeedableRng>::seed_from_u64(7);
        let mut reception = Reception::default();
        let (mut lost, mut runs, mut previous) = (0u64, 0u64, false);
        for sample in 0..SAMPLES {
            let this = reception.lost(sample * every_ms, &medium, &mut rng);
            lost += u64::from(this);
            runs += u64::from(this && !previous);
            previous = this;
        }
        (lost as f64 / SAMPLES as f64, lost as f64 / runs as f64)
    };
    let (share, mean_run) = heard(20, 1);
    assert!((0.09..0.11).contains(&share), "bursts: {share} lost");
    assert!(
        (17.0..23.0).contains(&mean_run),
        "bursts: runs of {mean_run}"
    );
    // Heard a minute apart, as in an idle group, bursts of 20 ms are as good
    // as independent: the channel starts afresh after a long silence, from
    // the long-run mix of hearing and not hearing.
    let (share, mean_run) = heard(20, 60_000);
    assert!((0.098..0.102).contains(&share), "sparse: {share} lost");
    assert!(
        (1.08..1.14).contains(&mean_run),
        "sparse: runs of {mean_run}"
    );
    // Independent losses run 1 / (1 - 0.1) = 1.11 long on average.
    let (share, mean_run) = heard(0, 1);
    assert!((0.098..0.102).contains(&share), "independent: {share} lost");
    assert!(
        (1.08..1.14).contains(&mean_run),
        "independent: runs of {mean_run}"
    );
}

#[test]
fn convergence_under_loss_duplication_and_reordering() {
    for seed in seeds(30) {
        // (loss %, mean burst ms): bursts as on Wi-Fi, a dozing station's
        // beacon interval too.
        for (loss, burst) in [(0, 0), (10, 0), (30, 0), (10, 5), (30, 100)] {
            let medium = Medium {
                loss_percent: loss,
                loss_burst_ms: burst,
                duplicate_percent: 10,
                delay_ms_min: 1,
                delay_ms_max: 30,
            };
            faulty_run(seed, medium, false, false);
        }
    }
}

#[test]
fn convergence_after_a_crash_and_restart_mid_burst() {
    for seed in seeds(30) {
        let medium = Medium {
            loss_percent: 10,
            ..Medium::default()
        };
        faulty_run(seed, medium, true, false);
    }
}

#[test]
fn convergence_with_clocks_minutes_off_and_jumping_back() {
    for seed in seeds(30) {
        faulty_run(seed, Medium::default(), false, true);
    }
}

#[test]
fn a_write_after_seeing_a_value_wins_even_from_a_clock_minutes_behind() {
    let mut sim = new_sim(7, 2, Medium::default());
    let mut oracle = Oracle::default();
    sim.set_clock_offset(0, 2 * 60_000);
    sim.set_clock_offset(1, -2 * 60_000);
    oracle.write(&mut sim, 0, "scene", Some(b"\"from the future\""));
    settle(&mut sim, &oracle, 7, MINUTE);
    oracle.write(&mut sim, 1, "scene", Some(b"\"later\""));
    settle(&mut sim, &oracle, 7, MINUTE);
    assert_eq!(data(&sim, 0)["scene"], b"\"later\"");
}

#[test]
fn a_cloned_node_id_is_noticed_and_replaced() {
    let config = Config::default();
    let factory = engine_factory(config);
    let mut sim = Sim::new(
        3,
        0,
        Medium::default(),
        Box::new(move |index, _, seed, now, persisted| {
            // Both gateways boot from the same image: the same persisted id.
            factory(index, gwsync::engine::NodeId(0xc10e), seed, now, persisted)
        }),
    );
    sim.add_node();
    sim.add_node();
    let mut oracle = Oracle::default();
    oracle.write(&mut sim, 0, "a", Some(b"1"));
    oracle.write(&mut sim, 1, "b", Some(b"2"));
    settle(&mut sim, &oracle, 3, 10 * MINUTE);
    let (a, b) = (engine(&sim, 0), engine(&sim, 1));
    assert_ne!(a.node_id(), b.node_id());
    assert!(a.counters().node_id_clashes + b.counters().node_id_clashes >= 1);
}

#[test]
fn random_topologies_and_faults_always_converge() {
    for seed in seeds(1000) {
        let mut rng =
            <gwsync::engine::SeededRng as rand::SeedableRng>::seed_from_u64(seed ^ 0x5eed);
        let n = rng.random_range(2..=6);
        let medium = Medium {
            loss_percent: [0, 0, 10, 30][rng.random_range(0..4)],
            loss_burst_ms: [0, 0, 5, 50][rng.random_range(0..4)],
            duplicate_percent: rng.random_range(0..10),
            delay_ms_min: 1,
            delay_ms_max: rng.random_range(1..60),
        };
        let mut sim = new_sim(seed, n, medium);
        let mut oracle = Oracle::default();
        for node in 0..n {
            if rng.random_bool(0.3) {
                sim.set_clock_offset(node, rng.random_range(-150_000..150_000));
            }
        }
        for _ in 0..rng.random_range(5..40) {
            let node = rng.random_range(0..n);
            match rng.random_range(0..100) {
                0..50 if sim.is_up(node) => {
                    let key = format!("k{}", rng.random_range(0..10));
                    let value = format!("{}", rng.random::<u16>());
                    oracle.write(&mut sim, node, &key, Some(value.as_bytes()));
                }
                50..60 if sim.is_up(node) => {
                    let key = format!("k{}", rng.random_range(0..10));
                    oracle.write(&mut sim, node, &key, None);
                }
                60..68 => sim.set_partition(node, rng.random_range(0..3)),
                68..72 => sim.heal(),
                72..78 if sim.is_up(node) => sim.crash(node),
                78..84 if !sim.is_up(node) => sim.restart(node),
                84..88 => sim.set_clock_offset(node, rng.random_range(-150_000..150_000)),
                _ => {}
            }
            let pause = rng.random_range(0..5_000);
            sim.run_for(pause);
        }
        sim.heal();
        for node in 0..n {
            if !sim.is_up(node) {
                sim.restart(node);
            }
        }
        settle(&mut sim, &oracle, seed, 60 * MINUTE);
    }
}

// ---------------------------------------------------------------------
// Byzantine peers and wrong clocks (hostile-peers issue). A forger lies
// with well-formed messages; honest gateways run with clocks days off.

const DAY: i64 = 86_400_000;

/// Checks the clock bound: no honest gateway's clock is further past the
/// largest wall clock it was ever given than `clock_ahead_max_ms`.
fn check_clocks(sim: &Sim, wall_max: &mut [u64], seed: u64) {
    let bound = Config::default().clock_ahead_max_ms;
    for (node, max) in wall_max.iter_mut().enumerate() {
        let Some(engine) = sim.gateway(node).and_then(|gateway| gateway.engine()) else {
            continue;
        };
        *max = (*max).max(sim.wall_ms(node));
        let clock = engine.clock_high_water().physical_ms();
        assert!(
            clock <= *max + bound + 1,
            "seed {seed}: node {node}'s clock {clock} is {} ms past its wall clock",
            clock - *max
        );
    }
}

/// The honest part of the data: keys the honest gateways write.
fn honest_data(sim: &Sim, node: usize) -> BTreeMap<String, Vec<u8>> {
    data(sim, node)
        .into_iter()
        .filter(|(key, _)| key.starts_with("h/"))
        .collect()
}

fn byzantine_run(seed: u64) {
    let mut sim = new_sim(seed, 4, Medium::default());
    let targets: Vec<String> = (0..6).map(|i| format!("h/{i}")).collect();
    let attack_ms = 10 * MINUTE;
    let forger = Forger::new(seed, sim.now(), 50, sim.now() + attack_ms, targets.clone());
    let forger = sim.add_gateway(Box::new(forger));
    // Honest gateways with wrong clocks: node 2 three days behind (no RTC,
    // before NTP), node 3 two days ahead. Node 3 does not write while
    // ahead: its versions would be refused until real time reaches them.
    sim.set_clock_offset(2, -3 * DAY);
    sim.set_clock_offset(3, 2 * DAY);
    let mut oracle = Oracle::default();
    let mut wall_max = vec![0u64; 4];
    let mut rng = <gwsync::engine::SeededRng as rand::SeedableRng>::seed_from_u64(seed);
    while sim.now() < attack_ms {
        let node = rng.random_range(0..3);
        let key = &targets[rng.random_range(0..targets.len())];
        let value = rng
            .random_bool(0.8)
            .then(|| format!("{}", rng.random::<u16>()));
        oracle.write(&mut sim, node, key, value.as_deref().map(str::as_bytes));
        sim.run_for(rng.random_range(100..20_000));
        check_clocks(&sim, &mut wall_max, seed);
    }
    // The attack is over and the clocks are set (NTP). Every honest key is
    // written once more, some deleted; those writes must reach everyone.
    sim.set_clock_offset(2, 0);
    sim.set_clock_offset(3, 0);
    // The forger pushed honest clocks up to the bound ahead, so versions
    // of the last writes can lie that far in the future: a write by a
    // gateway that has not seen them loses under last-writer-wins, which
    // is the damage the bound allows. Once the honest gateways agree (node
    // 3 first forgets what it took while two days ahead) each has seen
    // them, and every honest write must win.
    let agreed = sim.run_until_condition(30 * MINUTE, Sim::quiet);
    assert!(
        agreed.is_some(),
        "seed {seed}: no agreement after the attack"
    );
    let mut expected_oracle = Oracle::default();
    for key in &targets {
        let node = rng.random_range(0..4);
        let value = rng.random_bool(0.8).then(|| format!("after {key}"));
        let value = value.as_deref().map(str::as_bytes);
        if value.is_none()
            && sim
                .gateway(node)
                .and_then(|g| g.engine())
                .and_then(|e| e.get(key))
                .is_none()
        {
            // A delete needs a value to delete; write one first.
            expected_oracle.write(&mut sim, node, key, Some(b"1"));
        }
        expected_oracle.write(&mut sim, node, key, value);
        sim.run_for(rng.random_range(10..500));
    }
    let expected = expected_oracle.expected();
    let took = sim.run_until_condition(30 * MINUTE, |sim| {
        sim.quiet() && (0..4).all(|node| honest_data(sim, node) == expected)
    });
    assert!(
        took.is_some(),
        "seed {seed}: honest writes after the attack did not reach every gateway: {:?} vs {expected:?}",
        (0..4)
            .map(|node| honest_data(&sim, node))
            .collect::<Vec<_>>()
    );
    check_clocks(&sim, &mut wall_max, seed);
    let interval = Config::default().node_id_change_interval_ms;
    for node in 0..4 {
        let counters = engine(&sim, node).counters().clone();
        assert!(
            counters.node_id_clashes <= 1 + sim.now() / interval,
            "seed {seed}: node {node} changed its id {} times",
            counters.node_id_clashes
        );
        assert_eq!(counters.writes_version_exhausted, 0, "seed {seed}");
    }
    assert!(!sim.gateway(forger).unwrap().is_honest());
    drop(oracle);
}

#[test]
fn a_forger_and_clocks_days_off_cannot_crash_rewind_or_split_the_honest_gateways() {
    for seed in seeds(20) {
        byzantine_run(seed);
    }
}

/// A settled group of four holding 1,000 entries.
fn populated_group() -> Sim {
    settled_group(11, 4, 1_000)
}

#[test]
fn one_forged_datagram_of_any_type_draws_at_most_50_times_its_size() {
    for (name, datagram) in forged_datagrams(&populated_group()) {
        let answer = answer_to(populated_group, |_| datagram.clone(), 10_000);
        eprintln!(
            "{name}: {} B in, {} B out, {:.1}x",
            answer.bytes_in,
            answer.bytes_out,
            answer.factor()
        );
        if name.starts_with("bucket digests") {
            // A join request: answered with the store, paced (tested below).
            continue;
        }
        assert!(
            answer.factor() <= 50.0,
            "{name}: {answer:?} is {:.1}x",
            answer.factor()
        );
    }
}

#[test]
fn join_requests_are_served_once_per_window_at_the_repair_byte_budget() {
    let config = Config::default();
    let window_ms = 3_000;
    let first_second = answer_to(populated_group, |_| empty_store_digests(1), 1_000);
    let one = answer_to(populated_group, |_| empty_store_digests(1), window_ms);
    // Ten requests 90 ms apart, each with a fresh sequence number (as ten
    // joining gateways, or one forger, would send them), while the answer
    // to the first is still under way.
    let ten = answer_to_each(
        populated_group,
        |_| (1..=10).map(empty_store_digests).collect(),
        90,
        window_ms,
    );
    eprintln!(
        "one join request: {} B out ({} in its first second, budget {} B/s); ten: {} B in, {} B / {} datagrams out ({:.2}x one)",
        one.bytes_out,
        first_second.bytes_out,
        config.repair_bytes_per_sec_max,
        ten.bytes_in,
        ten.bytes_out,
        ten.datagrams_out,
        ten.bytes_out as f64 / one.bytes_out as f64
    );
    assert!(one.bytes_out > 0, "a join request must be answered");
    assert!(
        first_second.bytes_out <= config.repair_bytes_per_sec_max + 2_000,
        "{first_second:?} over the budget"
    );
    // The group answers the ten about once, not ten times.
    assert!(
        ten.bytes_out * 4 <= one.bytes_out * 5,
        "ten requests drew {ten:?}, one drew {one:?}"
    );
}

#[test]
fn replays_after_a_restart_change_neither_data_nor_node_ids() {
    let mut sim = new_sim(5, 3, Medium::default());
    let mut oracle = Oracle::default();
    sim.start_capture();
    oracle.write(&mut sim, 0, "door/code", Some(b"1234"));
    sim.run_for(10_000);
    oracle.write(&mut sim, 1, "door/code", None);
    settle(&mut sim, &oracle, 5, 10 * MINUTE);
    let captured: Vec<Vec<u8>> = sim.captured().iter().map(|d| d.to_vec()).collect();
    // Every gateway restarts (new boots, empty replay windows), and the
    // whole capture is replayed, in order and reversed.
    for node in 0..3 {
        sim.crash(node);
        sim.run_for(1_000);
        sim.restart(node);
    }
    let ids: Vec<_> = (0..3).map(|node| engine(&sim, node).node_id()).collect();
    for datagram in captured.iter().chain(captured.iter().rev()) {
        sim.inject(datagram.clone());
        sim.run_for(20);
    }
    settle(&mut sim, &oracle, 5, 10 * MINUTE);
    for (node, id) in ids.iter().enumerate() {
        assert_eq!(
            engine(&sim, node).node_id(),
            *id,
            "node {node} took a new id"
        );
        assert_eq!(engine(&sim, node).get("door/code"), None, "node {node}");
    }
    // And a gateway that joins after the capture.
    let joiner = sim.add_node();
    for datagram in &captured {
        sim.inject(datagram.clone());
        sim.run_for(20);
    }
    settle(&mut sim, &oracle, 5, 10 * MINUTE);
    assert_eq!(engine(&sim, joiner).get("door/code"), None);
}

#[test]
fn a_lone_write_leaves_at_once_and_writes_within_the_window_leave_together() {
    let config = Config::default();
    let window = config.push_delay_ms;
    let mut engines: Vec<Engine> = (0..2)
        .map(|i| {
            let mut engine = Engine::new(config.clone(), gwsync::engine::NodeId(i + 1), i, 0);
            engine.set_wall_clock(0, WALL);
            engine
        })
        .collect();
    let now = drive_bounded(&mut engines, 0, 100);
    let at = now + 10_000;
    for engine in &mut engines {
        engine.handle_timeout(at);
        while engine.poll_transmit().is_some() {}
    }
    engines[0].set(at, WALL, "scene/1", b"1").unwrap();
    assert_eq!(engines[0].poll_timeout(), at, "a lone write must not wait");
    engines[0].handle_timeout(at);
    let push = engines[0].poll_transmit().expect("pushed at once");
    engines[1].handle_datagram(at, &push);
    assert_eq!(engines[1].get("scene/1"), Some(&b"1"[..]));
    // Two more writes within the window: they wait for its end and leave
    // in one datagram.
    engines[0].set(at + 1, WALL, "scene/2", b"2").unwrap();
    engines[0].set(at + 1, WALL, "scene/3", b"3").unwrap();
    assert_eq!(engines[0].poll_timeout(), at + window);
    let pushes_before = engines[0].counters().pushes_sent;
    drive_bounded(&mut engines, at + 1, 100);
    assert_eq!(engines[0].counters().pushes_sent, pushes_before + 1);
    assert_eq!(engines[1].get("scene/3"), Some(&b"3"[..]));
}

const WALL: u64 = gwsync::sim::WALL_EPOCH_MS;

#[test]
fn a_gateway_that_missed_an_update_learns_it_from_the_next_push_of_anyone() {
    for seed in seeds(8) {
        let mut sim = new_sim(seed, 3, Medium::default());
        let mut oracle = Oracle::default();
        oracle.write(&mut sim, 0, "room/1", Some(b"0"));
        settle(&mut sim, &oracle, seed, 10 * MINUTE);
        // Trickle intervals are at Imax (64 s) by now: a summary within the
        // second after the next write would be chance.
        sim.run_for(20 * 64_000);
        sim.set_partition(2, 1);
        oracle.write(&mut sim, 0, "room/1", Some(b"missed"));
        sim.run_for(1_000);
        assert_eq!(
            data(&sim, 2).get("room/1").map(Vec::as_slice),
            Some(&b"0"[..])
        );
        sim.heal();
        let summaries_before: u64 = (0..3)
            .map(|node| engine(&sim, node).counters().summaries_sent)
            .sum();
        oracle.write(&mut sim, 1, "room/2", Some(b"next"));
        let took = sim.run_until_condition(1_000, |sim| data(sim, 2) == oracle.expected());
        assert!(
            took.is_some(),
            "seed {seed}: gateway 2 still lacks the missed update a second after the next push"
        );
        let summaries: u64 = (0..3)
            .map(|node| engine(&sim, node).counters().summaries_sent)
            .sum::<u64>()
            - summaries_before;
        assert!(summaries <= 3, "seed {seed}: {summaries} summaries");
    }
}

#[test]
fn with_writes_flowing_a_request_stops_once_a_push_shows_nothing_is_missing() {
    for seed in seeds(2) {
        let n = 32;
        let mut sim = new_sim(seed, n, Medium::default());
        let mut oracle = Oracle::default();
        oracle.write(&mut sim, 0, "room/1", Some(b"0"));
        settle(&mut sim, &oracle, seed, 10 * MINUTE);
        sim.set_medium(Medium {
            loss_percent: 30,
            ..Medium::default()
        });
        let requests = |sim: &Sim| -> u64 {
            (0..n)
                .map(|node| engine(sim, node).counters().bucket_digests_sent)
                .sum()
        };
        let before = requests(&sim);
        let writes = 50;
        let start = sim.now();
        for write in 0..writes {
            oracle.write(&mut sim, 0, &format!("stream/{write}"), Some(b"1"));
            sim.run_until(start + (write + 1) * 100);
        }
        settle(&mut sim, &oracle, seed, 10 * MINUTE);
        // Each request is answered by a repair or made moot by the next
        // push; asked again every 60 ms until its digest of then came back
        // (never, with writes flowing), it was 8 per write.
        let per_write = (requests(&sim) - before) as f64 / writes as f64;
        assert!(
            per_write <= 3.0,
            "seed {seed}: {per_write} requests per write"
        );
    }
}

#[test]
fn gateways_that_lost_a_push_are_mended_by_about_one_request_and_one_answer() {
    for seed in seeds(2) {
        let n = 32;
        let medium = Medium {
            loss_percent: 10,
            ..Medium::default()
        };
        let mut sim = new_sim(seed, n, medium);
        let mut oracle = Oracle::default();
        for i in 0..10 {
            oracle.write(&mut sim, i % n, &format!("room/{i}"), Some(b"0"));
        }
        settle(&mut sim, &oracle, seed, 10 * MINUTE);
        sim.run_for(20 * 64_000);
        let count = |sim: &Sim| {
            (0..n).fold((0, 0, 0), |(requests, answers, all), node| {
                let counters = engine(sim, node).counters();
                (
                    requests + counters.bucket_digests_sent,
                    answers + counters.repairs_sent,
                    all + counters.datagrams_sent,
                )
            })
        };
        let before = count(&sim);
        let updates = 10;
        for update in 0..updates {
            let key = format!("room/{}", update % 10);
            oracle.write(
                &mut sim,
                (update * 7) % n,
                &key,
                Some(format!("{update}").as_bytes()),
            );
            settle(&mut sim, &oracle, seed, 10 * MINUTE);
        }
        let after = count(&sim);
        let per_update = |a: u64, b: u64| (a - b) as f64 / updates as f64;
        let requests = per_update(after.0, before.0);
        let answers = per_update(after.1, before.1);
        let all = per_update(after.2, before.2);
        // About 3 of 31 gateways lose each push: without suppression each
        // of them would ask and each of 28 holders would answer.
        assert!(
            requests <= 2.0,
            "seed {seed}: {requests} requests per update"
        );
        assert!(answers <= 2.0, "seed {seed}: {answers} answers per update");
        assert!(all <= 6.0, "seed {seed}: {all} datagrams per update");
    }
}

#[test]
fn a_crash_loses_only_what_the_2_s_debounce_had_not_written() {
    let mut sim = new_sim(5, 3, Medium::default());
    sim.persist_debounced(2_000);
    sim.run_for(MINUTE);
    // Written at once (the first change after a quiet time), then held back.
    sim.write(0, "written", Some(b"1"));
    sim.run_for(100);
    sim.set_partition(0, 7);
    sim.write(0, "held-back", Some(b"2"));
    sim.run_for(500);
    let held = |p: &gwsync::sim::Persisted, key: &str| p.entries.iter().any(|(k, _)| k == key);
    assert!(held(sim.persisted(0), "written"));
    assert!(
        !held(sim.persisted(0), "held-back"),
        "written before the debounce allowed"
    );
    sim.crash(0);
    sim.restart(0);
    sim.heal();
    assert_eq!(
        data(&sim, 0).get("written").map(Vec::as_slice),
        Some(&b"1"[..])
    );
    assert!(
        !data(&sim, 0).contains_key("held-back"),
        "survived an unwritten crash"
    );
    // Nobody else held it either: lost, as on a real gateway.
    let mut oracle = Oracle::default();
    oracle.winners.insert(
        "written".into(),
        engine(&sim, 0).store().get("written").unwrap().to_owned(),
    );
    settle(&mut sim, &oracle, 5, 10 * MINUTE);
    // A change followed by 2 s of quiet is written, and survives.
    sim.set_partition(0, 7);
    oracle.write(&mut sim, 0, "kept", Some(b"3"));
    sim.run_for(2_500);
    sim.crash(0);
    sim.restart(0);
    sim.heal();
    assert!(data(&sim, 0).contains_key("kept"));
    settle(&mut sim, &oracle, 5, 10 * MINUTE);
}

#[test]
fn simbench_snapshot_matches_the_committed_table() {
    use gwsync::sim::bench::{self, Plan};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/simbench-snapshot.txt");
    let table = bench::table(&bench::run(&Plan::snapshot(), |_| {}));
    if std::env::var_os("GWSYNC_UPDATE_SNAPSHOT").is_some() {
        std::fs::write(&path, &table).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == table,
        "simbench figures changed; if intended, rerun with GWSYNC_UPDATE_SNAPSHOT=1 and commit {}\n--- committed\n{committed}--- now\n{table}",
        path.display()
    );
}
