//! What the network-namespace benchmarks share: talking to a gwsync daemon,
//! timing propagation from change notifications, reading a process's memory
//! and CPU time, per-frame loss, traffic counters on the bridge, and
//! cleanup of namespaces and processes when the run is interrupted.
//!
//! The topology itself (namespaces on a bridge, daemons) is
//! `tests/common`'s, so a benchmark measures exactly what the tests prove.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::common::{self, Daemon, Lan};

/// A change seen on node `.0` for key `.1` at `.2`.
pub type Arrival = (usize, String, Instant);

/// A persistent control-socket connection to one daemon.
pub struct Control {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Control {
    pub fn connect(daemon: &Daemon) -> Control {
        let stream = UnixStream::connect(&daemon.socket).expect("control socket");
        let reader = BufReader::new(stream.try_clone().unwrap());
        Control { stream, reader }
    }

    pub fn request(&mut self, line: &str) -> String {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).unwrap();
        reply
    }

    /// `set KEY VALUE`, where `value_json` is already JSON.
    pub fn set(&mut self, key: &str, value_json: &str) {
        let reply = self.request(&format!(
            r#"{{"op":"set","key":{},"value":{value_json}}}"#,
            serde_json::Value::from(key)
        ));
        assert!(reply.contains("true"), "set {key}: {reply}");
    }
}

/// The one field of a watch line the bench needs; the rest is skipped
/// unparsed.
#[derive(serde::Deserialize)]
struct WatchedKey {
    key: String,
}

/// Starts a `watch` on every daemon but the first; each change is sent as
/// an [`Arrival`].
pub fn watch_all(daemons: &[Daemon]) -> mpsc::Receiver<Arrival> {
    let (sender, receiver) = mpsc::channel();
    for (index, daemon) in daemons.iter().enumerate().skip(1) {
        let mut control = Control::connect(daemon);
        assert!(control.request(r#"{"op":"watch"}"#).contains("true"));
        let sender = sender.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while control.reader.read_line(&mut line).is_ok_and(|len| len > 0) {
                // Timed as read, before any parsing: the floor's receivers
                // are timed at their line too, and parse nothing.
                let at = Instant::now();
                if let Ok(change) = serde_json::from_str::<WatchedKey>(&line) {
                    if sender.send((index, change.key, at)).is_err() {
                        return;
                    }
                }
                line.clear();
            }
        });
    }
    receiver
}

/// One gwsync daemon per namespace of `lan`, on `eth0` and `port`.
pub fn start_gwsync(lan: &Lan, dir: &Path, port: u16) -> Vec<Daemon> {
    let port_text = port.to_string();
    let daemons: Vec<Daemon> = lan
        .nodes
        .iter()
        .enumerate()
        .map(|(index, node)| {
            Daemon::start(
                dir,
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
    for daemon in &daemons {
        cleanup_register_pid(daemon.pid());
    }
    daemons
}

/// Datagrams sent by the whole group, from the daemons' own counters.
pub fn datagrams_sent(daemons: &[Daemon]) -> u64 {
    daemons
        .iter()
        .map(|daemon| {
            daemon.status()["counters"]["datagrams_sent"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum()
}

/// Propagation latencies of one series of writes, in ms; a write that
/// never reached every receiver counts as infinitely late, so percentiles
/// never hide a failure.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    pub sorted_ms: Vec<f64>,
}

impl Latencies {
    pub fn percentile(&self, fraction: f64) -> f64 {
        percentile(&self.sorted_ms, fraction)
    }

    pub fn max(&self) -> f64 {
        self.sorted_ms.last().copied().unwrap_or(f64::NAN)
    }

    pub fn missing(&self) -> usize {
        self.sorted_ms.iter().filter(|ms| ms.is_infinite()).count()
    }
}

pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64) * fraction).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency of each of `writes` writes until every one of `receivers`
/// nodes reported its key on `events`. `write(i)` performs write `i` and
/// returns its key; keys must be unique within the series. Writes are paced
/// `gap` apart and not waited for, so a slow repair does not hold up the
/// next write; after the last one, stragglers get `timeout`.
pub fn propagation(
    writes: usize,
    gap: Duration,
    timeout: Duration,
    receivers: usize,
    events: &mpsc::Receiver<Arrival>,
    mut write: impl FnMut(usize) -> String,
) -> Latencies {
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut seen: HashMap<String, (HashSet<usize>, Instant)> = HashMap::new();
    let absorb = |seen: &mut HashMap<String, (HashSet<usize>, Instant)>, until: Instant| {
        while let Ok((node, key, at)) =
            events.recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            let entry = seen.entry(key).or_insert_with(|| (HashSet::new(), at));
            entry.0.insert(node);
            entry.1 = entry.1.max(at);
        }
    };
    let complete = |seen: &HashMap<String, (HashSet<usize>, Instant)>, key: &String| {
        seen.get(key)
            .is_some_and(|(nodes, _)| nodes.len() >= receivers)
    };
    for index in 0..writes {
        let start = Instant::now();
        let key = write(index);
        sent_at.insert(key, start);
        absorb(&mut seen, start + gap);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && sent_at.keys().any(|key| !complete(&seen, key)) {
        absorb(&mut seen, Instant::now() + Duration::from_millis(50));
    }
    let mut sorted_ms: Vec<f64> = sent_at
        .iter()
        .map(|(key, start)| match seen.get(key) {
            Some((_, last)) if complete(&seen, key) => {
                last.duration_since(*start).as_secs_f64() * 1000.0
            }
            _ => f64::INFINITY,
        })
        .collect();
    sorted_ms.sort_by(f64::total_cmp);
    Latencies { sorted_ms }
}

pub fn vm_hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// Private (anonymous) resident memory: what the daemon itself uses, without
/// the shared libc and binary pages that VmHWM also counts.
pub fn rss_anon_kib(pid: u32) -> u64 {
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

/// CPU time a process's main thread has used so far, in ms: the
/// scheduler's own count (ns) where the kernel keeps one, else user +
/// system ticks (10 ms apart: too coarse for a few microseconds a write).
pub fn cpu_ms(pid: u32) -> f64 {
    let schedstat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).unwrap_or_default();
    if let Some(on_cpu_ns) = schedstat
        .split_whitespace()
        .next()
        .and_then(|field| field.parse::<u64>().ok())
    {
        return on_cpu_ns as f64 / 1e6;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; fields after it may not.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let ticks: u64 = fields.get(11..13).map_or(0, |pair| {
        pair.iter().filter_map(|f| f.parse::<u64>().ok()).sum()
    });
    // SAFETY: sysconf only reads a constant of the running system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1000.0 / per_second
}

/// CPU per write, in us, of the process that sends each write and the
/// mean of those that receive it. Counted from the second write on, so the
/// processes' start (the floor's are spawned for each run) is left out.
#[derive(Clone, Copy, Debug)]
pub struct CpuPerWrite {
    pub sender: f64,
    pub receiver: f64,
}

pub struct CpuMeter {
    sender: u32,
    receivers: Vec<u32>,
    before: Option<(f64, f64)>,
    writes: usize,
}

impl CpuMeter {
    pub fn new(sender: u32, receivers: Vec<u32>) -> CpuMeter {
        CpuMeter {
            sender,
            receivers,
            before: None,
            writes: 0,
        }
    }

    fn receivers_ms(&self) -> f64 {
        self.receivers.iter().map(|&pid| cpu_ms(pid)).sum()
    }

    /// Called before each write (index as `propagation` counts them).
    pub fn before_write(&mut self, index: usize) {
        if index == 1 {
            self.before = Some((cpu_ms(self.sender), self.receivers_ms()));
        }
        if index >= 1 {
            self.writes += 1;
        }
    }

    /// Once every write has been seen (or timed out).
    pub fn per_write(&self) -> CpuPerWrite {
        let (sender, receivers) = self.before.unwrap_or((0.0, 0.0));
        let writes = self.writes.max(1) as f64;
        CpuPerWrite {
            sender: (cpu_ms(self.sender) - sender) * 1000.0 / writes,
            receiver: (self.receivers_ms() - receivers) * 1000.0
                / writes
                / self.receivers.len().max(1) as f64,
        }
    }
}

/// Runs `nft -f -` with `rules` inside namespace `netns`.
pub fn nft(netns: &str, rules: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "nft in {netns}: {}\n{rules}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Drops `percent` % of the frames of the given UDP ports arriving at
/// `eth0` of node `index`, and as many of every IPv6 fragment (the only
/// fragments on the LAN are those of large datagrams, which are gwsync's
/// never). Hooked at ingress, before reassembly: on a radio one frame is
/// lost, not one datagram, so a datagram of 45 fragments is lost with
/// probability 1 - 0.9^45 at 10 %.
pub fn inject_frame_loss(lan: &Lan, index: usize, percent: u32, ports: &[u16]) {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    nft(
        &lan.nodes[index],
        &format!(
            "table netdev benchloss {{
                chain lossy {{ numgen random mod 100 < {percent} drop; accept; }}
                chain ingress {{
                    type filter hook ingress device eth0 priority 0;
                    ip6 nexthdr ipv6-frag jump lossy;
                    udp dport {{ {} }} jump lossy;
                }}
            }}",
            ports.join(", ")
        ),
    );
}

pub fn remove_frame_loss(lan: &Lan, index: usize) {
    nft(&lan.nodes[index], "delete table netdev benchloss");
}

/// Datagrams and bytes (IP length) of one system as seen entering the
/// bridge, from every node together.
#[derive(Clone, Copy, Debug, Default)]
pub struct Traffic {
    pub datagrams: u64,
    pub bytes: u64,
}

impl Traffic {
    pub fn since(self, before: Traffic) -> Traffic {
        Traffic {
            datagrams: self.datagrams - before.datagrams,
            bytes: self.bytes - before.bytes,
        }
    }

    pub fn per_minute(self, window: Duration) -> (f64, f64) {
        let minutes = window.as_secs_f64() / 60.0;
        (self.datagrams as f64 / minutes, self.bytes as f64 / minutes)
    }
}

/// nftables counters on the bridge (in the hub namespace), at the
/// `prerouting` hook, which sees each frame once, as it enters from the
/// node that sent it: a multicast datagram counts once however many nodes
/// receive it, a unicast one once per destination.
pub struct BridgeCounters {
    hub: String,
}

impl BridgeCounters {
    /// Counts UDP to `port` (unfragmented) as one system, and UDP to
    /// `fragmenting_port` plus every IPv6 fragment as the other: a datagram
    /// is its unfragmented packet or its first fragment, its bytes are
    /// those of all its fragments.
    pub fn new(lan: &Lan, port: u16, fragmenting_port: u16) -> BridgeCounters {
        nft(
            &lan.hub,
            &format!(
                "table bridge benchcount {{
                    counter plain {{ }}
                    counter frag_first {{ }}
                    counter frag_all {{ }}
                    counter fragmenting_whole {{ }}
                    chain prerouting {{
                        type filter hook prerouting priority 0;
                        udp dport {port} counter name plain;
                        ip6 nexthdr ipv6-frag frag frag-off 0 counter name frag_first;
                        ip6 nexthdr ipv6-frag counter name frag_all accept;
                        udp dport {fragmenting_port} counter name fragmenting_whole;
                    }}
                }}"
            ),
        );
        BridgeCounters {
            hub: lan.hub.clone(),
        }
    }

    fn read(&self) -> HashMap<String, Traffic> {
        let output = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.hub,
                "nft",
                "-j",
                "list",
                "counters",
                "table",
                "bridge",
                "benchcount",
            ])
            .output()
            .expect("nft");
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("nft -j");
        json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item.get("counter"))
            .map(|counter| {
                (
                    counter["name"].as_str().unwrap_or_default().to_owned(),
                    Traffic {
                        datagrams: counter["packets"].as_u64().unwrap_or(0),
                        bytes: counter["bytes"].as_u64().unwrap_or(0),
                    },
                )
            })
            .collect()
    }

    /// (the plain system, the fragmenting system) so far.
    pub fn snapshot(&self) -> (Traffic, Traffic) {
        let counters = self.read();
        let get = |name: &str| counters.get(name).copied().unwrap_or_default();
        let whole = get("fragmenting_whole");
        (
            get("plain"),
            Traffic {
                datagrams: whole.datagrams + get("frag_first").datagrams,
                bytes: whole.bytes + get("frag_all").bytes,
            },
        )
    }
}

/// What to undo if the run is interrupted: Drop guards cover a normal end
/// and a panic, this covers SIGINT / SIGTERM / SIGHUP, which end the
/// process without unwinding.
struct Leftovers {
    namespaces: Vec<String>,
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    namespaces: Vec::new(),
    pids: Vec::new(),
    dirs: Vec::new(),
});

pub fn cleanup_register_lan(lan: &Lan) {
    let mut leftovers = LEFTOVERS.lock().unwrap();
    leftovers.namespaces.extend(lan.nodes.iter().cloned());
    leftovers.namespaces.push(lan.hub.clone());
}

pub fn cleanup_register_pid(pid: u32) {
    LEFTOVERS.lock().unwrap().pids.push(pid);
}

pub fn cleanup_register_dir(dir: &Path) {
    LEFTOVERS.lock().unwrap().dirs.push(dir.to_owned());
}

/// Blocks the termination signals in this thread (so in every thread
/// spawned after it; child processes get a clean mask from `Command`) and
/// starts the one thread that receives them: it kills every registered
/// process, deletes every registered namespace and directory, and exits.
/// Call first thing in `main`.
pub fn cleanup_on_signal() {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals.thread_block().expect("block signals");
    std::thread::spawn(move || {
        let signal = signals.wait().expect("sigwait");
        eprintln!("{signal:?}: cleaning up");
        let leftovers = LEFTOVERS
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for &pid in &leftovers.pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        for namespace in &leftovers.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .output();
        }
        for dir in &leftovers.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    });
}

/// A LAN of `nodes` namespaces, each `eth0` up with IPv4 and a usable IPv6
/// link-local address, registered for cleanup.
pub fn lan_up(tag: &str, nodes: usize) -> Lan {
    let lan = Lan::new(tag, nodes).expect("root");
    cleanup_register_lan(&lan);
    lan.connect_all();
    for index in 0..nodes {
        lan.wait_ipv6_ready(index);
    }
    lan
}

pub fn is_root() -> bool {
    common::is_root()
}
