//! Issue 7 benchmark: gwsync against A.L.F.R.E.D. (alfred), side by side on
//! one LAN of network namespaces, in the same run. Root only (it skips
//! otherwise); needs `alfred`, `nft`, `ip` and `stdbuf` on the PATH.
//!
//!     cargo bench --bench alfred                      # N = 3, 8, 16, table
//!     cargo bench --bench alfred -- --json > out.jsonl
//!     cargo bench --bench alfred -- --quick           # N = 3, 8, no idle windows
//!     cargo bench --bench alfred -- --n 8 --window 60
//!     cargo bench --bench alfred -- --table out.jsonl # table of a --json run
//!     python3 bench/plot_latency.py out.jsonl plot.svg
//!
//! For each N one topology (N namespaces on a bridge, `tests/common`'s
//! `Lan`) runs one gwsync daemon and one alfred primary (`alfred -i eth0
//! -b none -m`) in every namespace. Both write on node 0 and are timed to
//! the moment the last other node reports the change (gwsync `watch`,
//! alfred `-E` event monitor; alfred keeps one value per data type and
//! source, so every in-flight write gets a data type of its own). Measured
//! for both:
//!
//! - propagation p50 / p90 / p99 / max over `WRITES` writes, lossless and
//!   at 10 % loss (nftables `numgen random` at each namespace's ingress,
//!   per frame, so a lost fragment loses its datagram as on a radio);
//! - idle datagrams and bytes per minute entering the bridge from the whole
//!   group with 10 entries stored (one per 10 types for alfred), after
//!   gwsync's Trickle timer has grown to Imax;
//! - peak RSS (VmHWM), the highest of the group's daemons, with 10 entries
//!   and with 1,000 entries of 1 KB;
//! - CPU time (utime + stime) of the writing daemon for 1,000 writes made
//!   with each system's CLI, until the last is readable everywhere;
//! - the large store: 1,000 entries of 1 KB on node 0 (for alfred 20 data
//!   types of 50 such records: one type holds at most 64 KiB), then
//!   propagation of new small values at 10 % loss, and idle traffic with
//!   that store.
//!
//! A write that never reaches every node within the timeout counts as
//! infinitely late: it shows in the percentiles as "never", not as a gap.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "lan/mod.rs"]
mod lan;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{Daemon, Lan, TempDir, unique_port, wait_until};
use lan::{Arrival, BridgeCounters, Control, Latencies, Traffic, propagation};

/// alfred's fixed UDP port.
const ALFRED_PORT: u16 = 16962;
const LOSS_PERCENT: u32 = 10;
/// Writes per propagation series (the issue asks for at least 30).
const WRITES: usize = 30;
const LARGE_WRITES: usize = 10;
const CPU_WRITES: usize = 1_000;
const IDLE_ENTRIES: u8 = 10;
const STORE_RECORDS: usize = 1_000;
const STORE_RECORD_BYTES: usize = 1_000;
/// alfred records per data type in the large store: 50 KB, under alfred's
/// 64 KiB limit for one type's value.
const STORE_RECORDS_PER_TYPE: usize = 50;

// alfred data types (64 and up are free for applications), one range per
// series so that no event of one series is taken for another's.
const TYPE_IDLE: u8 = 64;
const TYPE_STORE: u8 = 74;
const TYPE_LOSSLESS: u8 = 100;
const TYPE_LOSSY: u8 = 140;
const TYPE_LARGE: u8 = 180;

/// alfred writes are spaced so that 30 of them sample its push timer at
/// phases spread over more than one period (370 ms does not divide 10 s).
const ALFRED_GAP: Duration = Duration::from_millis(370);
const GWSYNC_GAP: Duration = Duration::from_millis(50);
const GWSYNC_LOSSY_GAP: Duration = Duration::from_millis(100);
/// How long stragglers get after the last write of a series.
const LOSSLESS_TIMEOUT: Duration = Duration::from_secs(30);
const LOSSY_TIMEOUT: Duration = Duration::from_secs(120);
const LARGE_TIMEOUT: Duration = Duration::from_secs(60);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);

struct Options {
    json: bool,
    quick: bool,
    nodes: Vec<usize>,
    window: Duration,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|arg| arg == name)
            .and_then(|index| args.get(index + 1))
    };
    let quick = args.iter().any(|arg| arg == "--quick");
    Options {
        json: args.iter().any(|arg| arg == "--json"),
        quick,
        nodes: value("--n").map_or(if quick { vec![3, 8] } else { vec![3, 8, 16] }, |list| {
            list.split(',')
                .map(|n| n.parse().expect("--n takes numbers"))
                .collect()
        }),
        window: Duration::from_secs(
            value("--window").map_or(60, |secs| secs.parse().expect("--window takes seconds")),
        ),
    }
}

/// One alfred primary per namespace, and an event monitor on every one but
/// node 0's, all killed on drop.
struct Alfred {
    sockets: Vec<PathBuf>,
    primaries: Vec<Child>,
    monitors: Vec<Child>,
    /// Changes to node 0's data, as (node, data type, arrival); behind a
    /// lock so that both systems can be measured from two threads.
    events: Mutex<mpsc::Receiver<Arrival>>,
}

impl Alfred {
    fn start(lan: &Lan, dir: &Path) -> Alfred {
        let mut sockets = Vec::new();
        let mut primaries = Vec::new();
        for (index, node) in lan.nodes.iter().enumerate() {
            let socket = dir.join(format!("alfred{index}.sock"));
            let log = std::fs::File::create(dir.join(format!("alfred{index}.log"))).unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", node, "alfred", "-i", "eth0", "-b", "none"])
                .arg("-m")
                .arg("-u")
                .arg(&socket)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start alfred");
            lan::cleanup_register_pid(child.id());
            primaries.push(child);
            sockets.push(socket);
        }
        for socket in &sockets {
            wait_until(
                &format!("alfred answers on {}", socket.display()),
                Duration::from_secs(10),
                || alfred_cli(socket, &["-S"], None).is_some(),
            );
        }
        let writer_mac = mac_address(&lan.nodes[0]);
        let (sender, events) = mpsc::channel();
        let mut monitors = Vec::new();
        for (index, socket) in sockets.iter().enumerate().skip(1) {
            // Line-buffered: alfred's stdout is a pipe here, and each event
            // must arrive when it happens.
            let mut child = Command::new("stdbuf")
                .args(["-oL", "alfred", "-u"])
                .arg(socket)
                .arg("-E")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("alfred -E");
            lan::cleanup_register_pid(child.id());
            let stdout = BufReader::new(child.stdout.take().unwrap());
            let sender = sender.clone();
            let writer_mac = writer_mac.clone();
            std::thread::spawn(move || {
                // "Event: type = 64, source = 5a:c6:f7:4e:a8:00"
                for line in stdout.lines().map_while(Result::ok) {
                    let at = Instant::now();
                    let field = |name: &str| {
                        line.split(name)
                            .nth(1)
                            .map(|rest| rest.split(',').next().unwrap_or("").trim().to_owned())
                    };
                    if let (Some(data_type), Some(source)) = (field("type = "), field("source = "))
                    {
                        if source == writer_mac && sender.send((index, data_type, at)).is_err() {
                            return;
                        }
                    }
                }
            });
            monitors.push(child);
        }
        Alfred {
            sockets,
            primaries,
            monitors,
            events: Mutex::new(events),
        }
    }

    fn set(&self, node: usize, data_type: u8, data: &str) {
        let reply = alfred_cli(
            &self.sockets[node],
            &["-s", &data_type.to_string()],
            Some(data),
        );
        assert!(reply.is_some(), "alfred -s {data_type} on node {node}");
    }

    fn get(&self, node: usize, data_type: u8) -> String {
        alfred_cli(&self.sockets[node], &["-r", &data_type.to_string()], None).unwrap_or_default()
    }

    fn pids(&self) -> Vec<u32> {
        self.primaries.iter().map(Child::id).collect()
    }

    /// Waits until every other node reported a change of node 0's data of
    /// each type in `types`.
    fn wait_events(&self, types: std::ops::Range<u8>, timeout: Duration) {
        let mut missing: std::collections::HashSet<(usize, String)> = (1..self.sockets.len())
            .flat_map(|node| types.clone().map(move |t| (node, t.to_string())))
            .collect();
        let deadline = Instant::now() + timeout;
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((node, data_type, _)) = self.events.lock().unwrap().recv_timeout(left) else {
                panic!("alfred: {} type/node pairs never arrived", missing.len());
            };
            missing.remove(&(node, data_type));
        }
    }
}

impl Drop for Alfred {
    fn drop(&mut self) {
        for child in self.monitors.iter_mut().chain(&mut self.primaries) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `alfred -u SOCKET ARGS` (with `stdin` as its input); its stdout
/// when it succeeds.
fn alfred_cli(socket: &Path, args: &[&str], stdin: Option<&str>) -> Option<String> {
    let mut child = Command::new("alfred")
        .arg("-u")
        .arg(socket)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("alfred client");
    if let Some(data) = stdin {
        // A failed write shows as alfred's failure below.
        let _ = child.stdin.take().unwrap().write_all(data.as_bytes());
    }
    let output = child.wait_with_output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The MAC address of `eth0` in `netns`: alfred's source id with `-b none`.
fn mac_address(netns: &str) -> String {
    let output = Command::new("ip")
        .args(["-n", netns, "-j", "link", "show", "eth0"])
        .output()
        .expect("ip link");
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).expect("ip -j");
    links[0]["address"]
        .as_str()
        .expect("eth0 address")
        .to_owned()
}

/// How long gwsync's Trickle timer takes to grow from Imin to Imax after
/// its last reset: idle traffic is only steady after that.
fn trickle_settle() -> Duration {
    let trickle = gwsync::engine::Config::default().trickle;
    let mut interval = trickle.imin_ms.max(1);
    let mut total = 0;
    while interval < trickle.imax_ms {
        total += interval;
        interval *= 2;
    }
    Duration::from_millis(total + trickle.imin_ms)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    Gwsync,
    Alfred,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Gwsync => "gwsync",
            System::Alfred => "alfred",
        }
    }
}

/// One line of the result: a system, a group size and a case.
struct Row {
    system: System,
    n: usize,
    loss: u32,
    case: &'static str,
    latencies: Latencies,
    idle: Option<(f64, f64)>,
    rss_kb_idle: Option<u64>,
    rss_kb_1k: Option<u64>,
    cpu_ms_per_1k_writes: Option<f64>,
}

const CASE_SMALL: &str = "10 entries";
const CASE_LARGE: &str = "1000 x 1 KB";

/// The side of the comparison that lives in one system: its writes and
/// what it reports, so every phase measures both the same way.
struct Group<'a> {
    lan: &'a Lan,
    daemons: &'a [Daemon],
    gwsync_events: Mutex<mpsc::Receiver<Arrival>>,
    alfred: &'a Alfred,
}

impl Group<'_> {
    fn gwsync_series(
        &self,
        tag: &str,
        writes: usize,
        gap: Duration,
        timeout: Duration,
    ) -> Latencies {
        let mut control = Control::connect(&self.daemons[0]);
        let others = self.daemons.len() - 1;
        let events = self.gwsync_events.lock().unwrap();
        propagation(writes, gap, timeout, others, &events, |write| {
            let key = format!("bench/{tag}/{write}");
            control.set(&key, &format!(r#"{{"n":{write}}}"#));
            key
        })
    }

    fn alfred_series(&self, first_type: u8, writes: usize, timeout: Duration) -> Latencies {
        let others = self.alfred.sockets.len() - 1;
        let events = self.alfred.events.lock().unwrap();
        propagation(writes, ALFRED_GAP, timeout, others, &events, |write| {
            let data_type = first_type + write as u8;
            self.alfred.set(0, data_type, &format!("n={write}"));
            data_type.to_string()
        })
    }

    /// CPU ms the writing daemon spends on `CPU_WRITES` writes through each
    /// system's own CLI (one client process and connection per write for
    /// both), cycling over the 10 entries, until the last write is readable
    /// on every node.
    fn gwsync_cpu(&self) -> f64 {
        let before = lan::cpu_ms(self.daemons[0].pid());
        let mut last = (String::new(), String::new());
        for write in 0..CPU_WRITES {
            last = (room_key(write % 10), format!(r#"{{"n":{write}}}"#));
            self.daemons[0].set(&last.0, &last.1);
        }
        for daemon in self.daemons {
            wait_until(
                "the last gwsync write is everywhere",
                CONVERGE_TIMEOUT,
                || daemon.get(&last.0).as_deref() == Some(last.1.as_str()),
            );
        }
        (lan::cpu_ms(self.daemons[0].pid()) - before) * 1000.0 / CPU_WRITES as f64
    }

    fn alfred_cpu(&self) -> f64 {
        let pid = self.alfred.pids()[0];
        let before = lan::cpu_ms(pid);
        let mut last = (0, String::new());
        for write in 0..CPU_WRITES {
            last = (TYPE_IDLE + (write % 10) as u8, format!("cpu={write}"));
            self.alfred.set(0, last.0, &last.1);
        }
        let quoted = format!("\"{}\"", last.1);
        for node in 0..self.alfred.sockets.len() {
            wait_until(
                "the last alfred write is everywhere",
                CONVERGE_TIMEOUT,
                || self.alfred.get(node, last.0).contains(&quoted),
            );
        }
        (lan::cpu_ms(pid) - before) * 1000.0 / CPU_WRITES as f64
    }

    fn peak_rss(&self) -> (u64, u64) {
        let peak = |pids: Vec<u32>| pids.into_iter().map(lan::vm_hwm_kib).max().unwrap_or(0);
        (
            peak(self.daemons.iter().map(Daemon::pid).collect()),
            peak(self.alfred.pids()),
        )
    }

    fn loss(&self, on: bool, gwsync_port: u16) {
        for index in 0..self.lan.nodes.len() {
            if on {
                lan::inject_frame_loss(self.lan, index, LOSS_PERCENT, &[gwsync_port, ALFRED_PORT]);
            } else {
                lan::remove_frame_loss(self.lan, index);
            }
        }
    }
}

fn room_key(index: usize) -> String {
    format!("room/{index}")
}

const ROOM_JSON: &str = r#"{"name":"living room","lights":3,"scene":"evening"}"#;

/// One 1 KB record of the large store.
fn store_record(index: usize) -> String {
    let mut record = format!("device {index:04}: ");
    while record.len() < STORE_RECORD_BYTES {
        record.push_str("living room lamp, dimmable, 2700 K; ");
    }
    record.truncate(STORE_RECORD_BYTES);
    record
}

/// Idle traffic of both systems: alfred's window starts at once (its
/// traffic has no warm-up), gwsync's once its Trickle timer reached Imax
/// (`settled`); `meanwhile` runs during gwsync's window and may use alfred
/// but not gwsync. Returns (gwsync, alfred) per minute.
fn idle_windows(
    counters: &BridgeCounters,
    daemons: &[Daemon],
    settled: Instant,
    window: Duration,
    meanwhile: impl FnOnce(),
) -> ((f64, f64), (f64, f64)) {
    let alfred_start = (Instant::now(), counters.snapshot().1);
    // A measurement window, not a wait for an event: gwsync has nothing to
    // report when its timer reaches Imax.
    std::thread::sleep(
        settled
            .saturating_duration_since(Instant::now())
            .max(window),
    );
    let (gwsync_start, alfred_end) = counters.snapshot();
    let alfred = alfred_end
        .since(alfred_start.1)
        .per_minute(alfred_start.0.elapsed());
    let gwsync_started = Instant::now();
    let counters_before = group_counters(&statuses(daemons));
    meanwhile();
    std::thread::sleep(window.saturating_sub(gwsync_started.elapsed()));
    let gwsync_end: Traffic = counters.snapshot().0;
    // What the group sent and dropped in the window, by kind: an idle
    // figure above a few datagrams per minute is explained by this line.
    let statuses_after = statuses(daemons);
    let sent_and_dropped: Vec<String> = group_counters(&statuses_after)
        .into_iter()
        .filter_map(|(name, end)| {
            let delta = end - counters_before.get(&name).copied().unwrap_or(0);
            (delta > 0).then(|| format!("{name} {delta}"))
        })
        .collect();
    let digests: std::collections::BTreeSet<&str> = statuses_after
        .iter()
        .map(|status| status["digest"].as_str().unwrap_or("?"))
        .collect();
    eprintln!(
        "gwsync idle window: {}; {} distinct digest(s) at its end",
        sent_and_dropped.join(", "),
        digests.len()
    );
    let gwsync = gwsync_end
        .since(gwsync_start)
        .per_minute(gwsync_started.elapsed());
    (gwsync, alfred)
}

fn statuses(daemons: &[Daemon]) -> Vec<serde_json::Value> {
    daemons.iter().map(Daemon::status).collect()
}

/// The counters of `gwsync status` (drop reasons as `dropped.<reason>`)
/// summed over the group.
fn group_counters(statuses: &[serde_json::Value]) -> std::collections::BTreeMap<String, u64> {
    let mut sums = std::collections::BTreeMap::new();
    for status in statuses {
        let counters = status["counters"].as_object().cloned().unwrap_or_default();
        for (name, value) in counters {
            let mut add = |name: String, value: &serde_json::Value| {
                *sums.entry(name).or_insert(0) += value.as_u64().unwrap_or(0);
            };
            match value.as_object() {
                Some(reasons) => {
                    for (reason, count) in reasons {
                        add(format!("{name}.{reason}"), count);
                    }
                }
                None => add(name, &value),
            }
        }
    }
    sums
}

fn run(nodes: usize, options: &Options) -> Vec<Row> {
    let lan = lan::lan_up("alfred-bench", nodes);
    let dir = TempDir::new("alfred-bench");
    lan::cleanup_register_dir(dir.path());
    let port = unique_port();
    let counters = BridgeCounters::new(&lan, port, ALFRED_PORT);
    let daemons = lan::start_gwsync(&lan, dir.path(), port);
    let alfred = Alfred::start(&lan, dir.path());
    let group = Group {
        lan: &lan,
        daemons: &daemons,
        gwsync_events: Mutex::new(lan::watch_all(&daemons)),
        alfred: &alfred,
    };
    let progress = |what: &str| eprintln!("N={nodes}: {what}");

    // Ten entries, spread over the nodes as gateways own their own devices.
    for entry in 0..IDLE_ENTRIES {
        let node = entry as usize % nodes;
        daemons[node].set(&room_key(entry as usize), ROOM_JSON);
        alfred.set(node, TYPE_IDLE + entry, ROOM_JSON);
    }
    for daemon in &daemons {
        wait_until("every gateway holds 10 entries", CONVERGE_TIMEOUT, || {
            daemon.status()["live_entries"].as_u64() == Some(IDLE_ENTRIES.into())
        });
    }
    let settled = Instant::now() + trickle_settle();
    for node in 0..nodes {
        for data_type in TYPE_IDLE..TYPE_IDLE + IDLE_ENTRIES {
            wait_until("every alfred holds 10 entries", CONVERGE_TIMEOUT, || {
                alfred.get(node, data_type).contains("living room")
            });
        }
    }
    progress("10 entries everywhere");

    let mut alfred_lossless = Latencies::default();
    let mut alfred_cpu = 0.0;
    let alfred_measurements = || {
        progress("alfred lossless propagation");
        let lossless = group.alfred_series(TYPE_LOSSLESS, WRITES, LOSSLESS_TIMEOUT);
        progress("alfred CPU per 1,000 writes");
        (lossless, group.alfred_cpu())
    };
    let (gwsync_idle, alfred_idle) = if options.quick {
        (alfred_lossless, alfred_cpu) = alfred_measurements();
        (None, None)
    } else {
        progress("idle windows (10 entries)");
        let (gwsync, alfred) = idle_windows(&counters, &daemons, settled, options.window, || {
            (alfred_lossless, alfred_cpu) = alfred_measurements();
        });
        (Some(gwsync), Some(alfred))
    };

    progress("gwsync lossless propagation");
    let gwsync_lossless = group.gwsync_series("lossless", WRITES, GWSYNC_GAP, LOSSLESS_TIMEOUT);
    progress("gwsync CPU per 1,000 writes");
    let gwsync_cpu = group.gwsync_cpu();
    let (gwsync_rss_idle, alfred_rss_idle) = group.peak_rss();

    progress("10 % loss: both systems at once");
    group.loss(true, port);
    let (gwsync_lossy, alfred_lossy) = std::thread::scope(|scope| {
        let gwsync =
            scope.spawn(|| group.gwsync_series("loss", WRITES, GWSYNC_LOSSY_GAP, LOSSY_TIMEOUT));
        let alfred = group.alfred_series(TYPE_LOSSY, WRITES, LOSSY_TIMEOUT);
        (gwsync.join().unwrap(), alfred)
    });
    group.loss(false, port);

    progress("large store");
    let mut control = Control::connect(&daemons[0]);
    for record in 0..STORE_RECORDS {
        control.set(
            &format!("store/{record:04}"),
            &serde_json::Value::from(store_record(record)).to_string(),
        );
    }
    let expected = daemons[0].status()["live_entries"].as_u64().unwrap();
    for daemon in &daemons {
        wait_until("every gateway holds the store", CONVERGE_TIMEOUT, || {
            daemon.status()["live_entries"].as_u64() == Some(expected)
        });
    }
    let settled = Instant::now() + trickle_settle();
    let store_types = (STORE_RECORDS / STORE_RECORDS_PER_TYPE) as u8;
    for chunk in 0..store_types {
        let first = chunk as usize * STORE_RECORDS_PER_TYPE;
        let data: String = (first..first + STORE_RECORDS_PER_TYPE)
            .map(|record| format!("store/{record:04}={}\n", store_record(record)))
            .collect();
        alfred.set(0, TYPE_STORE + chunk, &data);
    }
    alfred.wait_events(TYPE_STORE..TYPE_STORE + store_types, CONVERGE_TIMEOUT);
    let (gwsync_rss_1k, alfred_rss_1k) = group.peak_rss();

    let (gwsync_large_idle, alfred_large_idle) = if options.quick {
        (None, None)
    } else {
        progress("idle windows (large store)");
        let (gwsync, alfred) = idle_windows(&counters, &daemons, settled, options.window, || {});
        (Some(gwsync), Some(alfred))
    };
    progress("large store, 10 % loss");
    group.loss(true, port);
    let large_writes = if options.quick { 5 } else { LARGE_WRITES };
    let gwsync_large = group.gwsync_series("large", large_writes, ALFRED_GAP, LOSSY_TIMEOUT);
    let alfred_large = group.alfred_series(TYPE_LARGE, large_writes, LARGE_TIMEOUT);
    group.loss(false, port);

    let row = |system, loss, case, latencies| Row {
        system,
        n: nodes,
        loss,
        case,
        latencies,
        idle: None,
        rss_kb_idle: None,
        rss_kb_1k: None,
        cpu_ms_per_1k_writes: None,
    };
    vec![
        Row {
            idle: gwsync_idle,
            rss_kb_idle: Some(gwsync_rss_idle),
            rss_kb_1k: Some(gwsync_rss_1k),
            cpu_ms_per_1k_writes: Some(gwsync_cpu),
            ..row(System::Gwsync, 0, CASE_SMALL, gwsync_lossless)
        },
        Row {
            idle: alfred_idle,
            rss_kb_idle: Some(alfred_rss_idle),
            rss_kb_1k: Some(alfred_rss_1k),
            cpu_ms_per_1k_writes: Some(alfred_cpu),
            ..row(System::Alfred, 0, CASE_SMALL, alfred_lossless)
        },
        row(System::Gwsync, LOSS_PERCENT, CASE_SMALL, gwsync_lossy),
        row(System::Alfred, LOSS_PERCENT, CASE_SMALL, alfred_lossy),
        Row {
            idle: gwsync_large_idle,
            ..row(System::Gwsync, LOSS_PERCENT, CASE_LARGE, gwsync_large)
        },
        Row {
            idle: alfred_large_idle,
            ..row(System::Alfred, LOSS_PERCENT, CASE_LARGE, alfred_large)
        },
    ]
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some((value * 100.0).round() / 100.0)
}

fn json_row(row: &Row) -> serde_json::Value {
    let latency = |fraction| finite(row.latencies.percentile(fraction));
    serde_json::json!({
        "system": row.system.name(),
        "n": row.n,
        "loss": row.loss,
        "case": row.case,
        "writes": row.latencies.sorted_ms.len(),
        "not_converged": row.latencies.missing(),
        "p50_ms": latency(0.5),
        "p90_ms": latency(0.9),
        "p99_ms": latency(0.99),
        "max_ms": finite(row.latencies.max()),
        "idle_datagrams_per_min": row.idle.map(|idle| idle.0),
        "idle_bytes_per_min": row.idle.map(|idle| idle.1),
        "rss_kb_idle": row.rss_kb_idle,
        "rss_kb_1k": row.rss_kb_1k,
        "cpu_ms_per_1k_writes": row.cpu_ms_per_1k_writes,
        "latencies_ms": row.latencies.sorted_ms.iter().map(|&ms| finite(ms)).collect::<Vec<_>>(),
    })
}

/// The inverse of [`json_row`], for `--table FILE`.
fn row_from_json(json: &serde_json::Value) -> Row {
    let number = |name: &str| json[name].as_f64();
    let mut sorted_ms: Vec<f64> = json["latencies_ms"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|ms| ms.as_f64().unwrap_or(f64::INFINITY))
        .collect();
    sorted_ms.sort_by(f64::total_cmp);
    Row {
        system: if json["system"] == "alfred" {
            System::Alfred
        } else {
            System::Gwsync
        },
        n: json["n"].as_u64().unwrap_or(0) as usize,
        loss: json["loss"].as_u64().unwrap_or(0) as u32,
        case: if json["case"] == CASE_LARGE {
            CASE_LARGE
        } else {
            CASE_SMALL
        },
        latencies: Latencies { sorted_ms },
        idle: number("idle_datagrams_per_min").zip(number("idle_bytes_per_min")),
        rss_kb_idle: json["rss_kb_idle"].as_u64(),
        rss_kb_1k: json["rss_kb_1k"].as_u64(),
        cpu_ms_per_1k_writes: number("cpu_ms_per_1k_writes"),
    }
}

fn cell(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(value) if value.is_infinite() => "never".into(),
        Some(value) if value >= 100.0 => format!("{value:.0}"),
        Some(value) => format!("{value:.1}"),
    }
}

fn ratio(gwsync: Option<f64>, alfred: Option<f64>) -> String {
    match (gwsync, alfred) {
        (Some(g), Some(a)) if a.is_infinite() && g.is_finite() => "0 (alfred never)".into(),
        (Some(g), Some(a)) if a > 0.0 && g.is_finite() && a.is_finite() => {
            let ratio = g / a;
            if ratio < 0.1 {
                format!("1/{:.0}", 1.0 / ratio)
            } else {
                format!("{ratio:.2}")
            }
        }
        _ => "-".into(),
    }
}

fn columns(row: &Row) -> Vec<Option<f64>> {
    vec![
        Some(row.latencies.percentile(0.5)),
        Some(row.latencies.percentile(0.9)),
        Some(row.latencies.percentile(0.99)),
        Some(row.latencies.max()),
        row.idle.map(|idle| idle.0),
        row.idle.map(|idle| idle.1),
        row.rss_kb_idle.map(|kb| kb as f64),
        row.rss_kb_1k.map(|kb| kb as f64),
        row.cpu_ms_per_1k_writes,
    ]
}

fn print_table(rows: &[Row]) {
    println!(
        "| N | loss | store | system | p50 ms | p90 ms | p99 ms | max ms | not converged \
         | idle datagrams/min | idle bytes/min | VmHWM KiB (10) | VmHWM KiB (1k) | CPU ms / 1k writes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for pair in rows.chunks(2) {
        let [gwsync, alfred] = pair else { continue };
        for row in pair {
            let cells: Vec<String> = columns(row).into_iter().map(cell).collect();
            println!(
                "| {} | {} % | {} | {} | {} | {}/{} | {} |",
                row.n,
                row.loss,
                row.case,
                row.system.name(),
                cells[..4].join(" | "),
                row.latencies.missing(),
                row.latencies.sorted_ms.len(),
                cells[4..].join(" | ")
            );
        }
        let ratios: Vec<String> = columns(gwsync)
            .into_iter()
            .zip(columns(alfred))
            .map(|(g, a)| ratio(g, a))
            .collect();
        println!(
            "| {} | {} % | {} | gwsync/alfred | {} | | {} |",
            gwsync.n,
            gwsync.loss,
            gwsync.case,
            ratios[..4].join(" | "),
            ratios[4..].join(" | ")
        );
    }
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let alfred = Command::new("alfred")
        .arg("-v")
        .output()
        .map(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    format!(
        "kernel {}, {} CPUs, {alfred}, gwsync {}",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        env!("CARGO_PKG_VERSION")
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(index) = args.iter().position(|arg| arg == "--table") {
        // The table of an earlier `--json` run; needs no root.
        let path = args.get(index + 1).expect("--table takes a file");
        let text = std::fs::read_to_string(path).expect("--table file");
        let rows: Vec<Row> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| row_from_json(&serde_json::from_str(line).expect("a JSON row")))
            .collect();
        print_table(&rows);
        return;
    }
    if !common::is_root() {
        eprintln!("SKIP bench alfred: network namespaces need root");
        return;
    }
    for tool in ["alfred", "nft", "stdbuf"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |output| !output.status.success())
        {
            eprintln!(
                "SKIP bench alfred: `{tool}` is not installed (apt-get install alfred nftables)"
            );
            return;
        }
    }
    lan::cleanup_on_signal();
    let options = options();
    eprintln!("{}", machine());
    let mut rows = Vec::new();
    for &nodes in &options.nodes {
        let result = run(nodes, &options);
        if options.json {
            for row in &result {
                println!("{}", json_row(row));
            }
        }
        rows.extend(result);
    }
    if !options.json {
        print_table(&rows);
    }
}
