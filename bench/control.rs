//! Control socket under a misbehaving local client (issue 12). One daemon
//! on loopback holding 1,000 entries (a `dump` is about 120 KB); for each
//! way one local client misbehaves, another client runs 500 `get`s, each
//! on a new connection as the CLI does, one every 2 ms, and we print their latency p50 /
//! p99 / max, how many were refused, and the daemon's peak RSS (VmHWM)
//! so far. Targets: p99 under 10 ms, peak RSS under 16 MB.
//!
//! `cargo bench --bench control` (no root needed).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Daemon, TempDir, unique_port};

const GETS: usize = 500;
const ENTRIES: usize = 1_000;

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|text| text.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64) * fraction).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One request on a new connection, as the CLI makes it; `None` when the
/// daemon refused or closed the connection without an answer.
fn request(socket: &Path, line: &str) -> Option<String> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(line.as_bytes()).ok()?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).ok()?;
    reply.contains("\"ok\":true").then_some(reply)
}

/// Background misbehaviour, stopped and joined on drop.
struct Misbehaving {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    _held: Vec<UnixStream>,
}

impl Misbehaving {
    fn none() -> Misbehaving {
        Misbehaving::holding(Vec::new())
    }

    fn holding(held: Vec<UnixStream>) -> Misbehaving {
        Misbehaving {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            _held: held,
        }
    }

    fn thread(mut self, body: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Misbehaving {
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || body(stop)));
        self
    }
}

impl Drop for Misbehaving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn pipelined_dumps(socket: &Path) -> Misbehaving {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_nonblocking(true).unwrap();
    let requests = b"{\"op\":\"dump\"}\n".repeat(2_000);
    let mut sent = 0;
    while sent < requests.len() {
        match stream.write(&requests[sent..]) {
            Ok(len) => sent += len,
            Err(_) => break,
        }
    }
    Misbehaving::holding(vec![stream])
}

fn idle_connections(socket: &Path, count: usize, first_bytes: &[u8]) -> Misbehaving {
    let held = (0..count)
        .filter_map(|_| {
            let mut stream = UnixStream::connect(socket).ok()?;
            stream.write_all(first_bytes).ok()?;
            Some(stream)
        })
        .collect();
    Misbehaving::holding(held)
}

fn unread_watch_with_writes(socket: &Path) -> Misbehaving {
    let mut watcher = UnixStream::connect(socket).unwrap();
    watcher.write_all(b"{\"op\":\"watch\"}\n").unwrap();
    let socket = socket.to_owned();
    Misbehaving::holding(vec![watcher]).thread(move |stop| {
        let stream = UnixStream::connect(&socket).unwrap();
        let mut reader = BufReader::new(&stream);
        let value = format!("\"{}\"", "w".repeat(1_000));
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let line = format!(
                "{{\"op\":\"set\",\"key\":\"watched/{}\",\"value\":{value}}}\n",
                n % 50
            );
            if (&stream).write_all(line.as_bytes()).is_err() {
                break;
            }
            let mut reply = String::new();
            if reader.read_line(&mut reply).unwrap_or(0) == 0 {
                break;
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

fn bad_request_spam(socket: &Path) -> Misbehaving {
    let socket = socket.to_owned();
    Misbehaving::none().thread(move |stop| {
        let stream = UnixStream::connect(&socket).unwrap();
        let mut reader = BufReader::new(&stream);
        while !stop.load(Ordering::Relaxed) {
            let bad = b"{\"op\":\"get\",\"key\":\"a\",\"op\":\"del\"}\n";
            if (&stream).write_all(bad).is_err() {
                break;
            }
            let mut reply = String::new();
            if reader.read_line(&mut reply).unwrap_or(0) == 0 {
                break;
            }
        }
    })
}

fn connect_storm(socket: &Path) -> Misbehaving {
    let socket = socket.to_owned();
    Misbehaving::none().thread(move |stop| {
        // The rate: 20,000 connections a second.
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..20 {
                drop(UnixStream::connect(&socket));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

/// Starts one way of misbehaving against the socket.
type Start = dyn Fn(&Path) -> Misbehaving;

fn main() {
    let dir = TempDir::new("control-bench");
    let port = unique_port().to_string();
    let daemon = Daemon::start(
        dir.path(),
        "gw",
        None,
        &["--interface", "lo", "--port", &port],
    );
    let socket = daemon.socket.clone();
    {
        let stream = UnixStream::connect(&socket).unwrap();
        let mut reader = BufReader::new(&stream);
        for index in 0..ENTRIES {
            let line = format!(
                "{{\"op\":\"set\",\"key\":\"home/device/{index}\",\"value\":{{\"name\":\"device {index}\",\"room\":\"living room\",\"on\":true,\"level\":40}}}}\n"
            );
            (&stream).write_all(line.as_bytes()).unwrap();
            let mut reply = String::new();
            reader.read_line(&mut reply).unwrap();
        }
    }
    let dump_bytes = request(&socket, "{\"op\":\"dump\"}\n").map_or(0, |reply| reply.len());
    println!(
        "control socket bench: {ENTRIES} entries (dump reply {dump_bytes} bytes), {GETS} gets per row\n"
    );
    println!(
        "| one client misbehaving | get p50 ms | p99 ms | max ms | refused | daemon VmHWM KiB |"
    );
    println!("|---|---|---|---|---|---|");
    let scenarios: Vec<(&str, Box<Start>)> = vec![
        ("none", Box::new(|_| Misbehaving::none())),
        (
            "2,000 pipelined dumps, never read",
            Box::new(pipelined_dumps),
        ),
        (
            "40 idle connections",
            Box::new(|s| idle_connections(s, 40, b"")),
        ),
        (
            "60 connections stuck mid-request",
            Box::new(|s| idle_connections(s, 60, b"{\"op\":")),
        ),
        (
            "watch never read, 1 KB writes",
            Box::new(unread_watch_with_writes),
        ),
        (
            "duplicate-field requests, flat out",
            Box::new(bad_request_spam),
        ),
        ("connect/close storm, 20,000/s", Box::new(connect_storm)),
    ];
    let mut worst_p99 = 0f64;
    for (name, start) in scenarios {
        let misbehaving = start(&socket);
        let mut times = Vec::with_capacity(GETS);
        let mut refused = 0;
        for index in 0..GETS {
            let line = format!(
                "{{\"op\":\"get\",\"key\":\"home/device/{}\"}}\n",
                index % ENTRIES
            );
            let begin = Instant::now();
            match request(&socket, &line) {
                Some(_) => times.push(begin.elapsed().as_secs_f64() * 1000.0),
                None => refused += 1,
            }
            // One get every 2 ms, as a busy script would: the row spans a
            // second of misbehaviour, not a few milliseconds of it.
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(misbehaving);
        times.sort_by(f64::total_cmp);
        let p99 = percentile(&times, 0.99);
        worst_p99 = worst_p99.max(p99);
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {refused} | {} |",
            percentile(&times, 0.5),
            p99,
            times.last().copied().unwrap_or(f64::NAN),
            vm_hwm_kib(daemon.pid())
        );
    }
    let status = daemon.status();
    println!("\ncontrol counters: {}", status["control"]);
    println!(
        "worst p99 {worst_p99:.2} ms (target < 10), peak RSS {} KiB (target < 16384)",
        vm_hwm_kib(daemon.pid())
    );
}
