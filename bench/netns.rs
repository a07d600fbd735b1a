//! Issue 3 benchmark: N gateways, one daemon per network namespace, all on
//! one bridge. Run as root: `cargo bench --bench netns` (add `-- --quick`
//! to skip the idle-traffic measurement, which needs minutes of quiet).
//!
//! Prints, for N = 3 and N = 8: propagation latency from `set` on one
//! gateway to the value being readable on every other (time until the last
//! gateway's `watch` reports it; p50 / p99 / max over 50 writes), lossless
//! and with 10 % loss on every namespace (nftables `numgen random`); idle
//! datagrams per minute for the whole group (the daemons' own send
//! counters); peak RSS (VmHWM) of one daemon idle and holding 10,000 keys;
//! and the size of the stripped release binary.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Daemon, Lan, TempDir, unique_port, wait_until};

const WRITES: usize = 50;

struct Control {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Control {
    fn connect(daemon: &Daemon) -> Control {
        let stream = UnixStream::connect(&daemon.socket).expect("control socket");
        let reader = BufReader::new(stream.try_clone().unwrap());
        Control { stream, reader }
    }

    fn request(&mut self, line: &str) -> String {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).unwrap();
        reply
    }
}

/// Starts a `watch` on every daemon but the first; each line received is
/// sent as (daemon index, key, arrival time).
fn watch_all(daemons: &[Daemon]) -> mpsc::Receiver<(usize, String, Instant)> {
    let (sender, receiver) = mpsc::channel();
    for (index, daemon) in daemons.iter().enumerate().skip(1) {
        let mut control = Control::connect(daemon);
        assert!(control.request(r#"{"op":"watch"}"#).contains("true"));
        let sender = sender.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while control.reader.read_line(&mut line).is_ok_and(|len| len > 0) {
                if let Ok(change) = serde_json::from_str::<serde_json::Value>(&line) {
                    let key = change["key"].as_str().unwrap_or_default().to_owned();
                    if sender.send((index, key, Instant::now())).is_err() {
                        return;
                    }
                }
                line.clear();
            }
        });
    }
    receiver
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64) * fraction).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency (ms) from each write on gateway 0 until every other gateway
/// reported it; writes are paced `gap` apart and not waited for, so a slow
/// repair does not hold up the next write.
fn propagation(
    daemons: &[Daemon],
    tag: &str,
    gap: Duration,
    timeout: Duration,
) -> (Vec<f64>, usize) {
    let events = watch_all(daemons);
    let mut control = Control::connect(&daemons[0]);
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut seen: HashMap<String, (usize, Instant)> = HashMap::new();
    let others = daemons.len() - 1;
    let absorb = |events: &mpsc::Receiver<(usize, String, Instant)>,
                  seen: &mut HashMap<String, (usize, Instant)>,
                  wait: Duration| {
        let deadline = Instant::now() + wait;
        while let Ok((_, key, at)) =
            events.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let entry = seen.entry(key).or_insert((0, at));
            entry.0 += 1;
            entry.1 = entry.1.max(at);
        }
    };
    for write in 0..WRITES {
        let key = format!("bench/{tag}/{write}");
        let start = Instant::now();
        let reply = control.request(&format!(
            r#"{{"op":"set","key":"{key}","value":{{"n":{write}}}}}"#
        ));
        assert!(reply.contains("true"), "{reply}");
        sent_at.insert(key, start);
        absorb(&events, &mut seen, gap);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline
        && sent_at
            .keys()
            .any(|key| seen.get(key).is_none_or(|(count, _)| *count < others))
    {
        absorb(&events, &mut seen, Duration::from_millis(100));
    }
    let mut latencies = Vec::new();
    let mut missing = 0;
    for (key, start) in &sent_at {
        match seen.get(key) {
            Some((count, last)) if *count >= others => {
                latencies.push(last.duration_since(*start).as_secs_f64() * 1000.0)
            }
            _ => missing += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    (latencies, missing)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// Private (anonymous) resident memory: what the daemon itself uses, without
/// the shared libc and binary pages that VmHWM also counts.
fn rss_anon_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "RssAnon:")
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn datagrams_sent(daemons: &[Daemon]) -> u64 {
    daemons
        .iter()
        .map(|daemon| {
            daemon.status()["counters"]["datagrams_sent"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum()
}

fn latency_row(label: &str, (latencies, missing): &(Vec<f64>, usize)) -> String {
    format!(
        "| {label} | {:.1} | {:.1} | {:.1} | {} |",
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        missing
    )
}

fn run(nodes: usize, quick: bool) -> Vec<String> {
    let lan = Lan::new("bench", nodes).expect("root");
    lan.connect_all();
    let port = unique_port();
    let dir = TempDir::new("bench");
    let port_text = port.to_string();
    let daemons: Vec<Daemon> = lan
        .nodes
        .iter()
        .enumerate()
        .map(|(index, node)| {
            Daemon::start(
                dir.path(),
                &format!("gw{index}"),
                Some(node),
                &[
                    "--interface",
                    "eth0",
                    "--port",
                    &port_text,
                    "--log-level",
                    "warn",
                ],
            )
        })
        .collect();
    let mut rows = Vec::new();
    let lossless = propagation(
        &daemons,
        "lossless",
        Duration::from_millis(50),
        Duration::from_secs(30),
    );
    rows.push(latency_row(&format!("N={nodes} lossless"), &lossless));
    if !quick {
        // Trickle doubles from Imin to Imax (64 s) while all agree: wait for
        // the steady state, then count every datagram any daemon sends.
        std::thread::sleep(Duration::from_secs(150));
        let before = datagrams_sent(&daemons);
        let window = Duration::from_secs(180);
        std::thread::sleep(window);
        let sent = datagrams_sent(&daemons) - before;
        rows.push(format!(
            "| N={nodes} idle traffic | {:.2} datagrams/min for the group ({sent} in {} s) |",
            sent as f64 * 60.0 / window.as_secs_f64(),
            window.as_secs()
        ));
    }
    let idle_rss = vm_hwm_kib(daemons[1].pid());
    let idle_anon = rss_anon_kib(daemons[1].pid());
    for index in 0..nodes {
        lan.inject_loss(index, 10, port);
    }
    let lossy = propagation(
        &daemons,
        "loss10",
        Duration::from_millis(100),
        Duration::from_secs(180),
    );
    rows.push(latency_row(&format!("N={nodes} 10% loss"), &lossy));
    for index in 0..nodes {
        let node = &lan.nodes[index];
        common::run(
            "ip",
            &[
                "netns", "exec", node, "nft", "delete", "table", "inet", "gwloss",
            ],
        );
    }
    // 10,000 small keys written on gateway 0, received by all the others.
    let mut control = Control::connect(&daemons[0]);
    for key in 0..10_000 {
        let reply = control.request(&format!(
            r#"{{"op":"set","key":"load/{key:05}","value":{{"v":{key}}}}}"#
        ));
        assert!(reply.contains("true"), "{reply}");
    }
    let expected = daemons[0].status()["live_entries"].as_u64().unwrap();
    for daemon in &daemons {
        wait_until(
            "every gateway holds the 10,000 keys",
            Duration::from_secs(300),
            || daemon.status()["live_entries"].as_u64() == Some(expected),
        );
    }
    rows.push(format!(
        "| N={nodes} peak RSS (VmHWM) | idle {} KiB; with 10,000 keys: writer {} KiB, receiver {} KiB |",
        idle_rss,
        vm_hwm_kib(daemons[0].pid()),
        vm_hwm_kib(daemons[1].pid())
    ));
    rows.push(format!(
        "| N={nodes} private memory (RssAnon) | idle {} KiB; with 10,000 keys: writer {} KiB, receiver {} KiB |",
        idle_anon,
        rss_anon_kib(daemons[0].pid()),
        rss_anon_kib(daemons[1].pid())
    ));
    rows
}

fn main() {
    if !common::is_root() {
        eprintln!("SKIP bench: network namespaces need root");
        return;
    }
    let quick = std::env::args().any(|arg| arg == "--quick");
    let mut rows = vec![
        "| case | p50 ms | p99 ms | max ms | writes not converged |".to_owned(),
        "|---|---|---|---|---|".to_owned(),
    ];
    for nodes in [3, 8] {
        rows.extend(run(nodes, quick));
        eprintln!("N={nodes} done");
    }
    let binary = std::fs::metadata(common::BIN)
        .map(|meta| meta.len())
        .unwrap_or(0);
    rows.push(format!(
        "| binary under test ({}) | {binary} bytes |",
        common::BIN
    ));
    println!("{}", rows.join("\n"));
}
