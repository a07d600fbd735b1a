//! `gwsync`: the one binary (daemon, CLI, key generator, demo).
//!
//! One binary keeps one copy of the Rust runtime on a router's small flash;
//! arguments are parsed by hand for the same reason (no clap).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use gwsync::control::{self, ControlServer};
use gwsync::driver::{self, Driver, DriverConfig};
use gwsync::engine::{NodeId, TriggerReason};
use gwsync::net;

const VERSION: &str = env!("CARGO_PKG_VERSION");

const EXIT_OK: u8 = 0;
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;

const USAGE: &str = "\
usage:
  gwsync daemon [--interface IF]... [--group ADDR] [--port N] [--state-dir DIR]
                [--socket PATH] [--key-file FILE | --open] [--node-id HEX]
                [--log-level error|warn|info|debug] [--foreground [--syslog]]
                [--max-entries N] [--max-store-bytes N] [--tombstone-lifetime-s N]
                [--ubus-socket PATH (default /var/run/ubus/ubus.sock; \"\": off)]
  gwsync [--socket PATH] get KEY | set KEY JSON | del KEY | list [PREFIX]
                | dump | status | trigger [power-on|reconnect|network-up]
                | watch | reload
  gwsync genkey
  gwsync demo
  gwsync --version | --help

`set KEY -` reads the JSON value from standard input.
Exit codes: 0 ok, 1 error, 2 usage, 3 key not found.
";

/// A failure that ends the command: what to print and the exit code.
struct Failure {
    code: u8,
    message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_USAGE,
        message: format!("{}\n{USAGE}", message.into()),
    }
}

fn error(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_ERROR,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(args) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(failure) => {
            if !failure.message.is_empty() {
                eprintln!("gwsync: {}", failure.message.trim_end());
            }
            ExitCode::from(failure.code)
        }
    }
}

fn run(args: Vec<String>) -> Result<(), Failure> {
    let mut socket: Option<PathBuf> = None;
    let mut rest = args.into_iter();
    let command = loop {
        match rest.next().as_deref() {
            None => return Err(usage("no command given")),
            Some("--version" | "-V" | "-v" | "version" | "-version") => {
                println!("gwsync {VERSION}");
                return Ok(());
            }
            Some("--help" | "-h" | "help" | "-help" | "-?") => {
                print!("gwsync {VERSION}\n{USAGE}");
                return Ok(());
            }
            Some("--socket") => socket = Some(PathBuf::from(value_of("--socket", rest.next())?)),
            Some(command) => break command.to_owned(),
        }
    };
    let rest: Vec<String> = rest.collect();
    match command.as_str() {
        "daemon" => run_daemon(socket, rest),
        "genkey" => {
            no_more(&rest)?;
            genkey()
        }
        "demo" => {
            no_more(&rest)?;
            demo()
        }
        "get" | "set" | "del" | "list" | "dump" | "status" | "trigger" | "watch" | "reload" => {
            let socket = match socket {
                Some(socket) => socket,
                None => gwsync::config::default_socket(false)
                    .map_err(|failure| error(failure.message))?,
            };
            client(socket, &command, rest)
        }
        other => Err(usage(format!("unknown command: {other}"))),
    }
}

fn value_of(flag: &str, value: Option<String>) -> Result<String, Failure> {
    value.ok_or_else(|| usage(format!("{flag} needs a value")))
}

fn no_more(rest: &[String]) -> Result<(), Failure> {
    match rest.first() {
        Some(extra) => Err(usage(format!("unexpected argument: {extra}"))),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------- logging

/// In the foreground the log goes to stderr, unless `--syslog` asks for
/// syslog (the init script does: procd would log stderr at `err`); in the
/// background there is no terminal, so it goes to syslog.
fn init_logging(level: log::LevelFilter, foreground: bool, syslog: bool) {
    if (syslog || !foreground) && gwsync::logging::log_to_syslog(level) {
        return;
    }
    gwsync::logging::log_to_stderr(level);
}

// ----------------------------------------------------------------- daemon

fn run_daemon(socket: Option<PathBuf>, args: Vec<String>) -> Result<(), Failure> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};

    let config_failure = |failure: gwsync::config::ConfigError| match failure.kind {
        gwsync::config::ConfigErrorKind::Invalid => usage(failure.message),
        gwsync::config::ConfigErrorKind::Io => error(failure.message),
    };
    let options = gwsync::config::Config::from_daemon_args(args, socket).map_err(config_failure)?;
    init_logging(options.log_level, options.foreground, options.syslog);
    let driver_config = options.driver_config().map_err(|failure| Failure {
        // A missing key is not a typo: say it without the whole usage.
        code: EXIT_USAGE,
        message: failure.message,
    })?;
    let socket_path = options.socket.clone().unwrap_or_default();
    // Signals arrive on a signalfd polled with everything else, so a
    // SIGTERM can never interrupt a half-written state file.
    let mut signals = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
        Signal::SIGHUP,
    ] {
        signals.add(signal);
    }
    signals
        .thread_block()
        .map_err(|errno| error(format!("blocking signals: {errno}")))?;
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|errno| error(format!("signalfd: {errno}")))?;
    let mut control =
        ControlServer::bind(&socket_path).map_err(|failure| error(failure.to_string()))?;
    let mut driver = Driver::open(driver_config).map_err(|failure| error(failure.to_string()))?;
    log::info!("gwsync {VERSION} serving {}", control.path().display());
    let mut ubus = (!options.ubus_socket.as_os_str().is_empty())
        .then(|| gwsync::ubus::Ubus::new(&options.ubus_socket));
    let mut stopping = false;
    while !stopping {
        // Cap the wait so a clock oddity can never park the loop for long.
        let wait_ms = driver
            .timeout_ms()
            .unwrap_or(60_000)
            .min(control.timeout_ms().unwrap_or(60_000))
            .min(ubus.as_ref().and_then(|u| u.timeout_ms()).unwrap_or(60_000))
            .min(60_000);
        let ready = {
            let control_fds = control.poll_fds();
            let mut fds = vec![
                PollFd::new(driver.as_fd(), PollFlags::POLLIN),
                PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN),
            ];
            let ubus_fd = ubus.as_ref().and_then(|u| u.poll_fd());
            let ubus_fd = ubus_fd.map(|(fd, wants_write)| (fd, true, wants_write));
            for (fd, wants_read, wants_write) in control_fds.into_iter().chain(ubus_fd) {
                let mut flags = PollFlags::empty();
                if wants_read {
                    flags |= PollFlags::POLLIN;
                }
                if wants_write {
                    flags |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(fd, flags));
            }
            poll(
                &mut fds,
                PollTimeout::try_from(wait_ms).unwrap_or(PollTimeout::MAX),
            )
        };
        match ready {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => {
                log::error!("poll: {errno}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        while let Ok(Some(info)) = signal_fd.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGTERM | Signal::SIGINT) => stopping = true,
                Ok(Signal::SIGUSR1) => {
                    log::info!("SIGUSR1: starting a sync request");
                    driver.trigger(TriggerReason::Manual);
                }
                Ok(Signal::SIGHUP) => {
                    log::info!("SIGHUP: reloading the group keys");
                    // Errors are logged by the driver; the keys in use stay.
                    let _ = driver.reload_keys();
                }
                _ => log::info!("ignoring signal {}", info.ssi_signo),
            }
        }
        driver.process();
        control.process(&mut driver);
        if let Some(ubus) = &mut ubus {
            ubus.process(&mut driver);
        }
        while let Some(change) = driver.poll_change() {
            control.broadcast(&change);
            if let Some(ubus) = &mut ubus {
                ubus.broadcast(&change);
            }
        }
        control.flush();
    }
    match driver.flush() {
        Ok(()) => {
            log::info!("stopping: state saved");
            Ok(())
        }
        Err(failure) => {
            log::error!("stopping: {failure}");
            Err(error(format!("stopping: {failure}")))
        }
    }
}

// -------------------------------------------------------------------- CLI

fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

fn client(socket: PathBuf, command: &str, args: Vec<String>) -> Result<(), Failure> {
    let arg = |index: usize, name: &str| -> Result<String, Failure> {
        args.get(index)
            .cloned()
            .ok_or_else(|| usage(format!("{command}: missing {name}")))
    };
    let max_args = match command {
        "get" | "del" | "list" | "trigger" => 1,
        "set" => 2,
        _ => 0,
    };
    if let Some(extra) = args.get(max_args) {
        return Err(usage(format!("{command}: unexpected argument: {extra}")));
    }
    let request = match command {
        "get" | "del" => format!(
            "{{\"op\":\"{command}\",\"key\":{}}}",
            json_string(&arg(0, "KEY")?)
        ),
        "set" => {
            let key = arg(0, "KEY")?;
            let mut text = arg(1, "JSON")?;
            if text == "-" {
                text.clear();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .map_err(|failure| error(format!("reading the value from stdin: {failure}")))?;
            }
            // Checked here too so a typo gets a usage error at once, and so
            // the request stays one line.
            let value = driver::compact_json(&text).map_err(|message| Failure {
                code: EXIT_USAGE,
                message: format!(
                    "value is not valid JSON ({message}); strings need quotes, e.g. '\"on\"'"
                ),
            })?;
            format!(
                "{{\"op\":\"set\",\"key\":{},\"value\":{value}}}",
                json_string(&key)
            )
        }
        "list" => format!(
            "{{\"op\":\"list\",\"prefix\":{}}}",
            json_string(args.first().map_or("", String::as_str))
        ),
        "trigger" => {
            let reason = args.first().map_or("manual", String::as_str);
            if control::parse_trigger(reason).is_none() {
                return Err(usage(format!("trigger: unknown reason: {reason}")));
            }
            format!("{{\"op\":\"trigger\",\"reason\":{}}}", json_string(reason))
        }
        _ => format!("{{\"op\":\"{command}\"}}"),
    };
    let stream = control::connect(&socket).map_err(|failure| {
        error(format!(
            "cannot reach the daemon at {}: {failure} (is `gwsync daemon` running? --socket PATH)",
            socket.display()
        ))
    })?;
    let mut writer = &stream;
    writer
        .write_all(format!("{request}\n").as_bytes())
        .map_err(|failure| error(format!("sending to the daemon: {failure}")))?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|failure| error(format!("reading from the daemon: {failure}")))?;
    if line.is_empty() {
        return Err(error("the daemon closed the connection without answering"));
    }
    let reply: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_str(&line)
            .map_err(|_| error(format!("unexpected reply: {}", line.trim_end())))?;
    let field = |name: &str| reply.get(name).map(|raw| raw.get());
    if field("ok") != Some("true") {
        let code = field("error")
            .and_then(|raw| serde_json::from_str::<String>(raw).ok())
            .unwrap_or_default();
        let message = field("message")
            .and_then(|raw| serde_json::from_str::<String>(raw).ok())
            .unwrap_or_else(|| line.trim_end().to_owned());
        return Err(Failure {
            code: control::ErrorCode::from_name(&code).map_or(EXIT_ERROR, |code| code.exit_code()),
            message,
        });
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let printed = match command {
        "get" => writeln!(out, "{}", field("value").unwrap_or("null")),
        "dump" => writeln!(out, "{}", field("data").unwrap_or("{}")),
        "reload" => writeln!(
            out,
            "reloaded: {} key(s) in use",
            field("keys").unwrap_or("?")
        ),
        "list" => {
            let keys: Vec<String> = field("keys")
                .and_then(|raw| serde_json::from_str(raw).ok())
                .unwrap_or_default();
            keys.iter().try_for_each(|key| writeln!(out, "{key}"))
        }
        "status" => {
            let status: serde_json::Value = field("status")
                .and_then(|raw| serde_json::from_str(raw).ok())
                .unwrap_or_default();
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&status).unwrap_or_default()
            )
        }
        "watch" => {
            drop(out);
            return watch(reader);
        }
        _ => Ok(()),
    };
    printed.map_err(|failure| error(format!("writing output: {failure}")))
}

/// Copies change lines to stdout, one flushed line each, until the daemon
/// goes away (exit 1) or stdout does (exit 0: `gwsync watch | head`).
fn watch(mut reader: BufReader<&UnixStream>) -> Result<(), Failure> {
    let stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(error("the daemon closed the connection")),
            Ok(_) => {
                let mut out = stdout.lock();
                if out
                    .write_all(line.as_bytes())
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    return Ok(());
                }
            }
            Err(failure) => return Err(error(format!("reading from the daemon: {failure}"))),
        }
    }
}

fn genkey() -> Result<(), Failure> {
    let key = gwsync::crypto::GroupKey::generate()
        .map_err(|failure| error(format!("no randomness from the system: {failure}")))?;
    println!("{}", key.to_hex());
    Ok(())
}

// ------------------------------------------------------------------- demo

/// A port nobody on this host uses right now, so two demos never meet.
fn free_port() -> u16 {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::from_os_rng();
    for _ in 0..100 {
        let port = rng.random_range(20_000..60_000);
        if std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    47_373
}

fn demo() -> Result<(), Failure> {
    use gwsync::wire::{self, Message};

    gwsync::logging::log_to_stderr(log::LevelFilter::Error);
    let base = std::env::temp_dir().join(format!("gwsync-demo-{}", std::process::id()));
    let names = ["gw1", "gw2", "gw3"];
    let ids = [NodeId(0x0001), NodeId(0x0002), NodeId(0x0003)];
    let name_of = |id: NodeId| {
        ids.iter()
            .position(|&known| known == id)
            .map_or_else(|| id.to_string(), |at| names[at].to_owned())
    };
    let key = "home/living-room/scene";
    // The demo's own group key: sealed like any real group, and never the
    // key of a real group that may share this host's loopback.
    let group_key = gwsync::crypto::GroupKey::generate()
        .map_err(|failure| error(format!("no randomness from the system: {failure}")))?;
    let keyring = gwsync::crypto::Keyring::new(&group_key);
    let config_for = |index: usize, port: u16| DriverConfig {
        interfaces: vec!["lo".to_owned()],
        keys: vec![group_key.clone()],
        port,
        state_dir: Some(base.join(names[index])),
        node_id: Some(ids[index]),
        // Only gw2 starts a sync request at once; the others wait (Trickle
        // Imin 2 s) so the timeline shows the method's example clearly.
        engine: {
            let mut engine = gwsync::engine::Config::default();
            if index != 1 {
                engine.trickle.imin_ms = 2_000;
            }
            engine
        },
        ..DriverConfig::default()
    };
    println!("gwsync demo: three gateways on the loopback interface acting out the method.\n");
    println!("1. Apart, each gateway writes its own version of {key}:");
    for (index, name) in names.iter().enumerate() {
        let mut driver = Driver::open(config_for(index, free_port()))
            .map_err(|failure| error(failure.to_string()))?;
        let value = format!("{{\"version\":{},\"written_by\":\"{}\"}}", index + 1, name);
        driver
            .set(key, &value)
            .map_err(|failure| error(failure.to_string()))?;
        println!("   {name}: {key} = {value}");
        drop(driver);
        // Versions carry wall-clock milliseconds: keep them apart.
        std::thread::sleep(Duration::from_millis(5));
    }
    let port = free_port();
    println!("\n2. They join one group (239.255.73.73 port {port}); gw2 starts a sync request.");
    println!("   Each line: time, sender, what it multicast (or what a gateway applied).\n");
    let observer = net::GroupSocket::open(net::GROUP_V4_DEFAULT.into(), port)
        .map_err(|failure| error(format!("demo socket: {failure}")))?;
    let lo = net::interface_index("lo").ok_or_else(|| error("no loopback interface"))?;
    observer
        .join(lo)
        .map_err(|failure| error(format!("joining the group on lo: {failure}")))?;
    let start = Instant::now();
    let mut drivers = Vec::new();
    for index in [1, 0, 2] {
        drivers.push((
            index,
            Driver::open(config_for(index, port)).map_err(|failure| error(failure.to_string()))?,
        ));
    }
    let mut buf = vec![0u8; 65_536];
    let mut last_datagram = Instant::now();
    let deadline = start + Duration::from_secs(15);
    let mut converged_at = None;
    while Instant::now() < deadline {
        for (index, driver) in &mut drivers {
            driver.process();
            while let Some(change) = driver.poll_change() {
                if change.origin != ids[*index] {
                    println!(
                        "{:>6} ms  {}  takes the newer data: {} = {} (written by {})",
                        start.elapsed().as_millis(),
                        names[*index],
                        change.key,
                        change.value.as_deref().unwrap_or("(deleted)"),
                        name_of(change.origin)
                    );
                }
            }
            // What this gateway just sent, before anyone else reacts to it.
            while let Ok(net::Received::Datagram(len)) = observer.recv(&mut buf) {
                last_datagram = Instant::now();
                let Ok(packet) = wire::Packet::new_checked(&buf[..len]) else {
                    continue;
                };
                let header = packet.header();
                let Ok(payload) = keyring.open(&packet) else {
                    continue;
                };
                let Ok(message) = Message::parse_payload(header.message_type, &payload) else {
                    continue;
                };
                let what = match message {
                    Message::Summary(summary) => format!(
                        "sync request: I hold {} entr{} (digest {:016x})",
                        summary.entries,
                        if summary.entries == 1 { "y" } else { "ies" },
                        summary.digest
                    ),
                    Message::BucketDigests(digests) => format!(
                        "my data differs from what I heard: bucket digests of {} bucket(s)",
                        digests.buckets.len()
                    ),
                    Message::Entries(entries) => {
                        let listed: Vec<String> = entries
                            .entries
                            .iter()
                            .map(|entry| {
                                format!(
                                    "{} = {}",
                                    entry.key,
                                    String::from_utf8_lossy(
                                        entry.value.as_deref().unwrap_or(b"(deleted)")
                                    )
                                )
                            })
                            .collect();
                        match entries.repair {
                            Some(_) => {
                                format!("I have newer data, here it is: {}", listed.join(", "))
                            }
                            None => format!("new write: {}", listed.join(", ")),
                        }
                    }
                    Message::Fragment(fragment) => format!("fragment of {}", fragment.key),
                };
                println!(
                    "{:>6} ms  {}  -> group: {what}",
                    start.elapsed().as_millis(),
                    name_of(header.sender)
                );
            }
        }
        let all_v3 = drivers.iter().all(|(_, driver)| {
            driver
                .get(key)
                .is_some_and(|value| value.contains("\"version\":3"))
        });
        if all_v3 && converged_at.is_none() {
            converged_at = Some(start.elapsed());
        }
        if converged_at.is_some() && last_datagram.elapsed() > Duration::from_millis(500) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(drivers);
    let _ = std::fs::remove_dir_all(&base);
    match converged_at {
        Some(elapsed) => {
            println!(
                "\n3. All three gateways hold version 3 after {} ms; the older ones took it and stayed quiet.",
                elapsed.as_millis()
            );
            Ok(())
        }
        None => Err(error(
            "the gateways did not converge within 15 s: is multicast on the loopback interface blocked?",
        )),
    }
}
