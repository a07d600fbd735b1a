//! `gwsync`: the one binary (daemon, CLI, key generator, demo).
//!
//! One binary keeps one copy of the Rust runtime on a router's small flash;
//! arguments are parsed by hand for the same reason (no clap).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use gwsync::control::{self, ControlServer};
use gwsync::driver::{self, Driver, Readiness};
use gwsync::engine::TriggerReason;
use serde_json::Value;
use serde_json::value::RawValue;

// Not src/bin/demo.rs: cargo would take that for a binary of its own.
#[cfg(feature = "demo")]
#[path = "gwsync/demo.rs"]
mod demo;
#[path = "gwsync/waiter.rs"]
mod waiter;

const VERSION: &str = env!("CARGO_PKG_VERSION");

const EXIT_OK: u8 = 0;
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// One subcommand: its usage line, what it does, and its own options
/// (besides the global `--socket`, `--help`, `--version`).
struct Command {
    name: &'static str,
    synopsis: &'static str,
    about: &'static str,
    /// Options without a value.
    switches: &'static [&'static str],
    /// Options that take a value.
    valued: &'static [&'static str],
    /// Positional arguments: at least, at most.
    arity: (usize, usize),
    /// Talks to a running daemon over the control socket.
    client: bool,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "daemon",
        synopsis: "gwsync daemon [OPTIONS]",
        about: "\
Runs the gateway: joins the group, syncs with the other gateways and serves
the control socket. Options:
  --interface IF        join the group on IF (repeatable; default: the kernel's choice)
  --group ADDR          multicast group (default 239.255.73.73)
  --port N              UDP port (default 7373)
  --state-dir DIR       where node id and entries are kept
  --socket PATH         control socket (default /var/run/gwsync.sock as root)
  --key-file FILE       group key(s), one per line: the first sends, both are
                        accepted (`gwsync genkey > FILE`)
  --open                run without a key: anyone on the LAN can read and write
  --node-id HEX         fixed node id (default: random, kept in the state dir)
  --log-level LEVEL     error|warn|info|debug (default info)
  --max-entries N       store limit in entries, tombstones included (default 100000)
  --max-store-bytes N   store limit in bytes of keys and values (default 16777216)
  --tombstone-lifetime-s N
                        how long a delete is remembered (default 604800, 7 days)
  --foreground          stay in the foreground and log to stderr
  --syslog              with --foreground: log to syslog (what procd wants)
  --ubus-socket PATH    ubusd's socket (default /var/run/ubus/ubus.sock; '' turns ubus off)",
        switches: &[],
        valued: &[],
        arity: (0, usize::MAX),
        client: false,
    },
    Command {
        name: "get",
        synopsis: "gwsync get [--raw] [--] KEY",
        about: "\
Prints the value of KEY as JSON. With --raw a string value is printed without
quotes or escapes (for shell scripts); other values stay JSON.
Exit code 3 when KEY holds no value.",
        switches: &["--raw"],
        valued: &[],
        arity: (1, 1),
        client: true,
    },
    Command {
        name: "set",
        synopsis: "gwsync set [--] KEY JSON|-",
        about: "\
Stores a JSON value under KEY on every gateway of the group. Strings need
JSON quotes: gwsync set light/porch '\"on\"'. `-` reads the value from
standard input. A key that starts with `-` goes after `--`.",
        switches: &[],
        valued: &[],
        arity: (2, 2),
        client: true,
    },
    Command {
        name: "del",
        synopsis: "gwsync del [--] KEY",
        about: "Deletes KEY on every gateway of the group. Exit code 3 when KEY holds no value.",
        switches: &[],
        valued: &[],
        arity: (1, 1),
        client: true,
    },
    Command {
        name: "list",
        synopsis: "gwsync list [--json] [--] [PREFIX]",
        about: "\
Prints the keys that start with PREFIX (all keys without one), sorted, one a
line; --json prints them as one JSON array instead.",
        switches: &["--json"],
        valued: &[],
        arity: (0, 1),
        client: true,
    },
    Command {
        name: "dump",
        synopsis: "gwsync dump",
        about: "Prints every key and value as one JSON object (what `gwsync load` reads back).",
        switches: &[],
        valued: &[],
        arity: (0, 0),
        client: true,
    },
    Command {
        name: "load",
        synopsis: "gwsync load FILE|-",
        about: "\
Restores entries from FILE (`-`: standard input) by the merge rule, and
prints how many were applied, unchanged, kept (newer here) and rejected.
FILE is a state file (state.json from the state directory: every entry keeps
its version, so an older entry never overwrites a newer one) or the output
of `gwsync dump` (no versions: it only fills in keys this gateway has never
held, and never overwrites one). Exit code 1 when any entry was rejected.",
        switches: &[],
        valued: &[],
        arity: (1, 1),
        client: true,
    },
    Command {
        name: "status",
        synopsis: "gwsync status [--json]",
        about: "\
Prints a short summary: node id, key state, the gateways heard and whether
they hold the same data, the last change, and problems worth attention.
--json prints the full status object.",
        switches: &["--json"],
        valued: &[],
        arity: (0, 0),
        client: true,
    },
    Command {
        name: "health",
        synopsis: "gwsync health [--min-peers N]",
        about: "\
Prints one line and exits 0 when the daemon answers, its multicast socket is
open, its state is being saved and at least N other gateways (default 0)
were heard; exits 1 otherwise. For scripts, cron and procd.",
        switches: &[],
        valued: &["--min-peers"],
        arity: (0, 0),
        client: true,
    },
    Command {
        name: "trigger",
        synopsis: "gwsync trigger [power-on|reconnect|network-up|manual]",
        about: "Starts a sync request now (default reason: manual).",
        switches: &[],
        valued: &[],
        arity: (0, 1),
        client: true,
    },
    Command {
        name: "watch",
        synopsis: "gwsync watch",
        about: "\
Prints one JSON line per change (local or from the group) until interrupted:
{\"key\":...,\"value\":...,\"origin\":...} or {\"key\":...,\"deleted\":true,\"origin\":...}",
        switches: &[],
        valued: &[],
        arity: (0, 0),
        client: true,
    },
    Command {
        name: "reload",
        synopsis: "gwsync reload",
        about: "Makes the daemon re-read its key file (as SIGHUP does), keeping its data.",
        switches: &[],
        valued: &[],
        arity: (0, 0),
        client: true,
    },
    Command {
        name: "genkey",
        synopsis: "gwsync genkey",
        about: "Prints a new random group key (64 hex digits): gwsync genkey > /etc/gwsync.key",
        switches: &[],
        valued: &[],
        arity: (0, 0),
        client: false,
    },
    #[cfg(feature = "demo")]
    Command {
        name: "demo",
        synopsis: "gwsync demo",
        about: "Three gateways on the loopback interface show how they converge.",
        switches: &[],
        valued: &[],
        arity: (0, 0),
        client: false,
    },
    Command {
        name: "help",
        synopsis: "gwsync help [COMMAND]",
        about: "Prints the usage of gwsync or of one command.",
        switches: &[],
        valued: &[],
        arity: (0, 1),
        client: false,
    },
    Command {
        name: "version",
        synopsis: "gwsync version",
        about: "Prints gwsync's version.",
        switches: &[],
        valued: &[],
        arity: (0, 0),
        client: false,
    },
];

const GLOBAL_HELP: &str = "\
Global options (anywhere before `--`):
  --socket PATH   the daemon's control socket (default: $GWSYNC_SOCKET, else
                  /var/run/gwsync.sock as root, $XDG_RUNTIME_DIR/gwsync.sock otherwise)
  -h, --help      usage (of the command, when one is given)
  --version       gwsync's version
  --              ends the options: what follows is a key or value even if
                  it starts with `-`

Exit codes: 0 ok, 1 error, 2 usage, 3 key not found.
";

fn find_command(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|command| command.name == name)
}

fn overview() -> String {
    let mut text =
        format!("gwsync {VERSION}: multi-gateway data sync over UDP multicast\n\nusage:\n");
    for command in COMMANDS {
        text.push_str(&format!("  {}\n", command.synopsis));
    }
    text.push('\n');
    text.push_str(GLOBAL_HELP);
    text.push_str("\n`gwsync help COMMAND` or `gwsync COMMAND --help` describes one command.\n");
    text
}

fn command_help(command: &Command) -> String {
    let mut text = format!("usage: {}\n\n{}\n", command.synopsis, command.about);
    if command.client {
        text.push_str("\nTalks to the daemon at --socket PATH (or $GWSYNC_SOCKET).\n");
    }
    text
}

/// A failure that ends the command: what to print and the exit code.
struct Failure {
    code: u8,
    message: String,
}

/// A usage error: one line; `run` adds the command's usage line as a hint.
fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_USAGE,
        message: message.into(),
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

/// The command line, split: global options are taken wherever they stand
/// (before `--`), so `gwsync set k 1 --socket S` works.
#[derive(Default)]
struct Parsed {
    command: Option<&'static Command>,
    socket: Option<PathBuf>,
    help: bool,
    version: bool,
    /// The command's own options, with their values.
    options: Vec<(String, Option<String>)>,
    positional: Vec<String>,
    /// Everything after `daemon`, for its own parser.
    daemon_args: Vec<String>,
}

/// JSON numbers may be negative: `gwsync set t -5` is a value, not an option.
fn is_negative_number(arg: &str) -> bool {
    arg.strip_prefix('-')
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// Parses the command line; a failure comes with the command it concerns,
/// if one was named before it.
fn parse_args(args: Vec<String>) -> Result<Parsed, (Failure, Option<&'static Command>)> {
    let mut parsed = Parsed::default();
    parse_into(&mut parsed, args).map_err(|failure| (failure, parsed.command))?;
    Ok(parsed)
}

fn parse_into(parsed: &mut Parsed, args: Vec<String>) -> Result<(), Failure> {
    let mut args = args.into_iter();
    let mut options_ended = false;
    while let Some(arg) = args.next() {
        if parsed
            .command
            .is_some_and(|command| command.name == "daemon")
        {
            if matches!(arg.as_str(), "--help" | "-h") {
                parsed.help = true;
            }
            parsed.daemon_args.push(arg);
            continue;
        }
        let is_option = !options_ended
            && arg.starts_with('-')
            && arg != "-"
            && !(parsed.command.is_some_and(|command| command.name == "set")
                && parsed.positional.len() == 1
                && is_negative_number(&arg));
        if !is_option {
            if parsed.command.is_none() && !options_ended {
                parsed.command = Some(
                    find_command(&arg)
                        .ok_or_else(|| usage(format!("unknown command: {}", shown(&arg))))?,
                );
            } else {
                parsed.positional.push(arg);
            }
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => {
                (name.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        match name.as_str() {
            "--" => options_ended = true,
            "--socket" => {
                let value = inline.or_else(|| args.next());
                parsed.socket = Some(PathBuf::from(value_of("--socket", value)?));
            }
            "--help" | "-h" | "-help" | "-?" => parsed.help = true,
            "--version" | "-V" | "-version" => parsed.version = true,
            _ => {
                let takes_value = COMMANDS
                    .iter()
                    .any(|command| command.valued.contains(&name.as_str()));
                let value = match (takes_value, inline) {
                    (true, Some(value)) => Some(value),
                    (true, None) => Some(value_of(&name, args.next())?),
                    (false, Some(_)) => return Err(usage(format!("{name} takes no value"))),
                    (false, None) => None,
                };
                parsed.options.push((name, value));
            }
        }
    }
    Ok(())
}

/// An argument as an error shows it: control characters escaped.
fn shown(arg: &str) -> String {
    gwsync::engine::shown_key(arg)
}

fn run(args: Vec<String>) -> Result<(), Failure> {
    let parsed = match parse_args(args) {
        Ok(parsed) => parsed,
        Err((failure, command)) => return Err(with_hint(failure, command)),
    };
    let command = parsed.command;
    run_parsed(parsed).map_err(|failure| with_hint(failure, command))
}

/// Adds to a usage error the usage line it concerns and where to read more.
fn with_hint(mut failure: Failure, command: Option<&Command>) -> Failure {
    if failure.code == EXIT_USAGE {
        failure.message = match command {
            Some(command) => format!(
                "{}\nusage: {}   (more: gwsync help {})",
                failure.message, command.synopsis, command.name
            ),
            None => format!("{}\nrun `gwsync help` for the commands", failure.message),
        };
    }
    failure
}

fn run_parsed(parsed: Parsed) -> Result<(), Failure> {
    let Some(command) = parsed.command else {
        if parsed.help {
            say(&overview());
            return Ok(());
        }
        if parsed.version {
            say(&format!("gwsync {VERSION}\n"));
            return Ok(());
        }
        return Err(usage("no command given"));
    };
    if parsed.help {
        say(&command_help(command));
        return Ok(());
    }
    if parsed.version {
        say(&format!("gwsync {VERSION}\n"));
        return Ok(());
    }
    let name = command.name;
    for (option, _) in &parsed.options {
        if !command.switches.contains(&option.as_str())
            && !command.valued.contains(&option.as_str())
        {
            let hint = if matches!(name, "get" | "set" | "del") {
                " (a key that starts with `-` goes after `--`)"
            } else {
                ""
            };
            return Err(usage(format!(
                "{name}: unknown option {}{hint}",
                option.escape_debug()
            )));
        }
    }
    let (least, most) = command.arity;
    if parsed.positional.len() < least {
        // The missing one's name, as the usage line spells it.
        let wanted = command
            .synopsis
            .split_whitespace()
            .filter(|word| word.starts_with(|c: char| c.is_ascii_uppercase()))
            .nth(parsed.positional.len())
            .unwrap_or("argument");
        return Err(usage(format!("{name}: missing {wanted}")));
    }
    if let Some(extra) = parsed.positional.get(most) {
        return Err(usage(format!(
            "{name}: unexpected argument: {}",
            shown(extra)
        )));
    }
    let socket = parsed.socket.or_else(|| {
        std::env::var_os("GWSYNC_SOCKET")
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
    });
    match name {
        "daemon" => run_daemon(socket, parsed.daemon_args),
        "genkey" => genkey(),
        #[cfg(feature = "demo")]
        "demo" => demo::demo(),
        "version" => {
            say(&format!("gwsync {VERSION}\n"));
            Ok(())
        }
        "help" => match parsed.positional.first() {
            None => {
                say(&overview());
                Ok(())
            }
            Some(topic) => {
                let topic = find_command(topic)
                    .ok_or_else(|| usage(format!("help: unknown command: {}", shown(topic))))?;
                say(&command_help(topic));
                Ok(())
            }
        },
        _ => {
            let has = |option: &str| parsed.options.iter().any(|(name, _)| name == option);
            let value = |option: &str| {
                parsed
                    .options
                    .iter()
                    .rev()
                    .find(|(name, _)| name == option)
                    .and_then(|(_, value)| value.clone())
            };
            let request = ClientRequest {
                command: name,
                args: parsed.positional.clone(),
                raw: has("--raw"),
                json: has("--json"),
                min_peers: match value("--min-peers") {
                    None => 0,
                    Some(text) => text.parse().map_err(|_| {
                        usage(format!("--min-peers: not a number: {}", shown(&text)))
                    })?,
                },
            };
            let socket = match socket {
                Some(socket) => socket,
                None => gwsync::config::default_socket(false)
                    .map_err(|failure| error(failure.message))?,
            };
            client(socket, request)
        }
    }
}

/// Prints to stdout; a closed stdout (`gwsync help | head -1`) is not an
/// error worth a panic.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn value_of(flag: &str, value: Option<String>) -> Result<String, Failure> {
    value.ok_or_else(|| usage(format!("{flag} needs a value")))
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
    use nix::sys::epoll::EpollTimeout;
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::{AsRawFd, BorrowedFd};
    use waiter::{Interest, Waiter};

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
    let mut waiter = Waiter::new().map_err(|errno| error(format!("epoll: {errno}")))?;
    let mut stopping = false;
    while !stopping {
        // Cap the wait so a clock oddity can never park the loop for long.
        let wait_ms = driver
            .timeout_ms()
            .unwrap_or(60_000)
            .min(control.timeout_ms().unwrap_or(60_000))
            .min(ubus.as_ref().and_then(|u| u.timeout_ms()).unwrap_or(60_000))
            .min(60_000);
        let driver_fds = driver.poll_fds();
        let control_fds = control.poll_fds();
        let ubus_fd = ubus.as_ref().and_then(|u| u.poll_fd());
        let interest = |readable, writable| Interest { readable, writable };
        // In this order, so each owner can be told which of its fds were
        // ready.
        let wanted: Vec<(BorrowedFd<'_>, Interest)> = [driver_fds.datagrams, driver_fds.link]
            .into_iter()
            .flatten()
            .chain([signal_fd.as_fd()])
            .map(|fd| (fd, Interest::READABLE))
            .chain(
                control_fds
                    .iter()
                    .map(|&(fd, readable, writable)| (fd, interest(readable, writable))),
            )
            .chain(ubus_fd.map(|(fd, writable)| (fd, interest(true, writable))))
            .collect();
        let opened = driver.counters().socket_opens
            + control.counters().clients_accepted
            + ubus.as_ref().map_or(0, |u| u.connects());
        let waited = waiter.wait(
            &wanted,
            opened,
            EpollTimeout::try_from(wait_ms).unwrap_or(EpollTimeout::MAX),
        );
        if let Err(errno) = waited {
            if errno != nix::errno::Errno::EINTR {
                log::error!("waiting for input: {errno}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // After a failed wait nothing is known: every fd counts as ready.
        let is_ready = |fd: Option<BorrowedFd<'_>>| {
            fd.is_some_and(|fd| {
                waited
                    .as_ref()
                    .map_or(true, |ready| ready.contains(&fd.as_raw_fd()))
            })
        };
        let driver_ready = Readiness {
            datagrams: is_ready(driver_fds.datagrams),
            link: is_ready(driver_fds.link),
        };
        let signal_ready = is_ready(Some(signal_fd.as_fd()));
        let control_ready: Vec<bool> = control_fds
            .iter()
            .map(|&(fd, _, _)| is_ready(Some(fd)))
            .collect();
        let ubus_ready = ubus_fd.is_none() || is_ready(ubus_fd.map(|(fd, _)| fd));
        drop(wanted);
        let next_signal = || {
            signal_ready
                .then(|| signal_fd.read_signal().ok().flatten())
                .flatten()
        };
        while let Some(info) = next_signal() {
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
        driver.process_ready(driver_ready);
        control.process(&mut driver, &control_ready);
        if let Some(ubus) = &mut ubus {
            ubus.process(&mut driver, ubus_ready);
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

/// What a client command was asked to do.
struct ClientRequest {
    command: &'static str,
    args: Vec<String>,
    raw: bool,
    json: bool,
    min_peers: usize,
}

/// A reply's fields, raw, so values print with their exact text.
type Reply = BTreeMap<String, Box<RawValue>>;

/// One connection to the daemon: a request line out, a reply line back.
struct Connection {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Connection {
    fn open(socket: &Path) -> Result<Connection, Failure> {
        let stream = control::connect(socket).map_err(|failure| {
            error(format!(
                "cannot reach the daemon at {}: {failure} (is `gwsync daemon` running? --socket PATH or GWSYNC_SOCKET choose another)",
                socket.display()
            ))
        })?;
        let reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|failure| error(format!("control socket: {failure}")))?,
        );
        Ok(Connection { stream, reader })
    }

    /// Sends one request and returns the reply, or the daemon's error as a
    /// failure (exit code 3 for a missing key).
    fn call(&mut self, request: &str) -> Result<Reply, Failure> {
        self.stream
            .write_all(format!("{request}\n").as_bytes())
            .map_err(|failure| error(format!("sending to the daemon: {failure}")))?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|failure| error(format!("reading from the daemon: {failure}")))?;
        if line.is_empty() {
            return Err(error("the daemon closed the connection without answering"));
        }
        let reply: Reply = serde_json::from_str(&line)
            .map_err(|_| error(format!("unexpected reply: {}", line.trim_end())))?;
        if reply.get("ok").map(|raw| raw.get()) == Some("true") {
            return Ok(reply);
        }
        let text = |name: &str| {
            reply
                .get(name)
                .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        };
        let code = text("error").unwrap_or_default();
        Err(Failure {
            code: control::ErrorCode::from_name(&code).map_or(EXIT_ERROR, |code| code.exit_code()),
            message: text("message").unwrap_or_else(|| line.trim_end().to_owned()),
        })
    }
}

fn field<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.get(name).map(|raw| raw.get())
}

fn client(socket: PathBuf, request: ClientRequest) -> Result<(), Failure> {
    let args = &request.args;
    let first = args.first().map_or("", String::as_str);
    let line = match request.command {
        "get" | "del" => format!(
            "{{\"op\":\"{}\",\"key\":{}}}",
            request.command,
            json_string(first)
        ),
        "set" => {
            let mut text = args[1].clone();
            if text == "-" {
                text.clear();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .map_err(|failure| error(format!("reading the value from stdin: {failure}")))?;
            }
            // Checked here too so a typo gets a usage error at once, and so
            // the request stays one line.
            let value = driver::compact_json(&text).map_err(|message| {
                usage(format!(
                    "value is not valid JSON ({message}); strings need quotes, e.g. '\"on\"'"
                ))
            })?;
            format!(
                "{{\"op\":\"set\",\"key\":{},\"value\":{value}}}",
                json_string(first)
            )
        }
        "list" => format!("{{\"op\":\"list\",\"prefix\":{}}}", json_string(first)),
        "trigger" => {
            let reason = args.first().map_or("manual", String::as_str);
            if control::parse_trigger(reason).is_none() {
                return Err(usage(format!("trigger: unknown reason: {}", shown(reason))));
            }
            format!("{{\"op\":\"trigger\",\"reason\":{}}}", json_string(reason))
        }
        "load" => return load(&socket, first),
        "health" => return health(&socket, request.min_peers),
        command => format!("{{\"op\":\"{command}\"}}"),
    };
    let mut connection = Connection::open(&socket)?;
    let reply = connection.call(&line)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let printed = match request.command {
        "get" => {
            let value = field(&reply, "value").unwrap_or("null");
            match serde_json::from_str::<String>(value) {
                Ok(text) if request.raw => writeln!(out, "{text}"),
                _ => writeln!(out, "{value}"),
            }
        }
        "dump" => writeln!(out, "{}", field(&reply, "data").unwrap_or("{}")),
        "list" if request.json => writeln!(out, "{}", field(&reply, "keys").unwrap_or("[]")),
        "list" => {
            let keys: Vec<String> = field(&reply, "keys")
                .and_then(|raw| serde_json::from_str(raw).ok())
                .unwrap_or_default();
            keys.iter().try_for_each(|key| writeln!(out, "{key}"))
        }
        "status" => {
            let status: Value = field(&reply, "status")
                .and_then(|raw| serde_json::from_str(raw).ok())
                .unwrap_or_default();
            if request.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                )
            } else {
                out.write_all(status_summary(&status).as_bytes())
            }
        }
        "reload" => writeln!(
            out,
            "reloaded: {} key(s) in use",
            field(&reply, "keys").unwrap_or("?")
        ),
        "watch" => {
            drop(out);
            return watch(connection.reader);
        }
        _ => Ok(()),
    };
    printed.map_err(|failure| error(format!("writing output: {failure}")))
}

/// Copies change lines to stdout, one flushed line each, until the daemon
/// goes away (exit 1) or stdout does (exit 0: `gwsync watch | head`).
fn watch(mut reader: BufReader<UnixStream>) -> Result<(), Failure> {
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

/// Entries per `load` request stay under this many bytes of JSON, well
/// inside the control socket's request limit.
const LOAD_CHUNK_BYTES: usize = 256 * 1024;

/// `gwsync load FILE|-`: sends the entries in chunks and adds up the
/// daemon's counts.
fn load(socket: &Path, file: &str) -> Result<(), Failure> {
    let mut text = String::new();
    let read = if file == "-" {
        std::io::stdin().read_to_string(&mut text)
    } else {
        std::fs::File::open(file).and_then(|mut opened| opened.read_to_string(&mut text))
    };
    read.map_err(|failure| error(format!("load: reading {file}: {failure}")))?;
    let entries =
        load_entries(&text).map_err(|message| error(format!("load: {file}: {message}")))?;
    let mut connection = Connection::open(socket)?;
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    let mut errors: Vec<String> = Vec::new();
    let mut chunk = String::new();
    let mut entries = entries.into_iter().peekable();
    while let Some(entry) = entries.next() {
        if !chunk.is_empty() {
            chunk.push(',');
        }
        chunk.push_str(&entry);
        if chunk.len() < LOAD_CHUNK_BYTES && entries.peek().is_some() {
            continue;
        }
        let reply = connection.call(&format!("{{\"op\":\"load\",\"entries\":[{chunk}]}}"))?;
        chunk.clear();
        for name in ["applied", "unchanged", "kept_newer", "rejected"] {
            let count: u64 = field(&reply, name)
                .and_then(|raw| raw.parse().ok())
                .unwrap_or(0);
            *totals.entry(name).or_default() += count;
        }
        if let Some(more) =
            field(&reply, "errors").and_then(|raw| serde_json::from_str::<Vec<String>>(raw).ok())
        {
            errors.extend(more);
        }
    }
    let count = |name: &str| totals.get(name).copied().unwrap_or(0);
    say(&format!(
        "loaded {file}: {} applied, {} unchanged, {} kept (newer here), {} rejected\n",
        count("applied"),
        count("unchanged"),
        count("kept_newer"),
        count("rejected")
    ));
    if count("rejected") == 0 {
        return Ok(());
    }
    for line in &errors {
        eprintln!("gwsync: load: {line}");
    }
    Err(error(format!(
        "load: {} entries rejected",
        count("rejected")
    )))
}

/// The entries of a file to load, each one JSON object in the state
/// file's entry format: a state file's own entries (with versions), or a
/// plain dump's members (without).
fn load_entries(text: &str) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct StateFile<'a> {
        #[allow(dead_code)]
        format: u64,
        #[allow(dead_code)]
        node_id: Option<&'a str>,
        #[allow(dead_code)]
        clock: Option<u64>,
        #[serde(borrow)]
        entries: Vec<&'a RawValue>,
    }
    if let Ok(state) = serde_json::from_str::<StateFile>(text) {
        return Ok(state
            .entries
            .iter()
            .map(|raw| raw.get().to_owned())
            .collect());
    }
    let dump: BTreeMap<String, &RawValue> = serde_json::from_str(text)
        .map_err(|failure| format!("neither a state file nor a dump (a JSON object): {failure}"))?;
    Ok(dump
        .into_iter()
        .map(|(key, value)| format!("{{\"k\":{},\"v\":{}}}", json_string(&key), value.get()))
        .collect())
}

/// Milliseconds as a person reads them.
fn ago(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms ago"),
        // Integer arithmetic: float formatting costs flash.
        1_000..120_000 => format!("{}.{} s ago", ms / 1000, ms % 1000 / 100),
        120_000..7_200_000 => format!("{} min ago", ms / 60_000),
        _ => format!("{} h ago", ms / 3_600_000),
    }
}

/// `gwsync status` without --json. Fields a daemon of another version lacks
/// are left out.
fn status_summary(status: &Value) -> String {
    let mut out = String::new();
    let text = |value: &Value| {
        value
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| value.to_string())
    };
    out.push_str(&format!(
        "gwsync {} node {}, group {} port {}, up {}\n",
        status["version"].as_str().unwrap_or("?"),
        text(&status["node_id"]),
        text(&status["group"]),
        text(&status["port"]),
        ago(status["uptime_ms"].as_u64().unwrap_or(0)).trim_end_matches(" ago"),
    ));
    let key_state = match status["key_state"].as_str() {
        Some(state) => state.to_owned(),
        None if status["keyed"] == Value::Bool(true) => "keyed".to_owned(),
        None => "open".to_owned(),
    };
    out.push_str(&match key_state.as_str() {
        "open" => {
            "key: none (open group: any host on the LAN can read and change the data)\n".to_owned()
        }
        other => {
            // Fingerprints, so two gateways' keys can be compared by eye.
            let keys: Vec<String> = status["keys"]
                .as_array()
                .map(|keys| keys.iter().map(|key| text(&key["fingerprint"])).collect())
                .unwrap_or_default();
            match keys.len() {
                0 => format!("key: {other}\n"),
                _ => format!(
                    "key: {other} (sending with {})\n",
                    keys.join(", accepting ")
                ),
            }
        }
    });
    let interfaces: Vec<String> = status["interfaces"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|interface| {
                    let mut name = text(&interface["name"]);
                    if interface["joined"] != Value::Bool(true) {
                        name.push_str(" (not joined)");
                    }
                    name
                })
                .collect()
        })
        .unwrap_or_default();
    if !interfaces.is_empty() {
        out.push_str(&format!("interfaces: {}\n", interfaces.join(", ")));
    }
    let limits = &status["limits"];
    let of = |name: &str| match limits[name].as_u64() {
        Some(max) => format!(", max {max}"),
        None => String::new(),
    };
    out.push_str(&format!(
        "data: {} keys ({} entries with deletes{}), {} bytes{}, digest {}\n",
        status["live_entries"].as_u64().unwrap_or(0),
        status["entries"].as_u64().unwrap_or(0),
        of("max_entries"),
        status["store_bytes"].as_u64().unwrap_or(0),
        of("max_store_bytes"),
        status["digest"].as_str().unwrap_or("?"),
    ));
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    let in_sync = peers
        .iter()
        .filter(|peer| peer["in_sync"] == Value::Bool(true))
        .count();
    let knows_sync = peers.iter().any(|peer| peer["in_sync"].is_boolean());
    out.push_str(&match (peers.len(), knows_sync) {
        (0, _) => "gateways heard: none yet (see README: Troubleshooting)\n".to_owned(),
        (count, true) => {
            format!("gateways heard: {count}, {in_sync} with the same data at their last summary\n")
        }
        (count, false) => format!("gateways heard: {count}\n"),
    });
    for peer in &peers {
        let sync = match peer["in_sync"].as_bool() {
            Some(true) => ", same data",
            Some(false) => ", different data at its last summary",
            None => "",
        };
        out.push_str(&format!(
            "  {}  heard {}{sync}\n",
            text(&peer["node_id"]),
            ago(peer["last_heard_ms_ago"].as_u64().unwrap_or(0)),
        ));
    }
    if let Some(change) = status
        .get("last_change")
        .filter(|change| change.is_object())
    {
        let what = if change["deleted"] == Value::Bool(true) {
            "deleted"
        } else {
            "set"
        };
        out.push_str(&format!(
            "last change: {} {what} by {}, {}\n",
            shown(change["key"].as_str().unwrap_or("?")),
            text(&change["origin"]),
            ago(change["ms_ago"].as_u64().unwrap_or(0)),
        ));
    }
    for warning in status_problems(status) {
        out.push_str(&format!("attention: {warning}\n"));
    }
    out
}

/// Problems worth a person's attention, one line each.
fn status_problems(status: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if status["socket_open"] == Value::Bool(false) {
        problems.push("no multicast socket open (is an interface up?)".to_owned());
    }
    let persist = &status["persist"];
    if persist["ok"] == Value::Bool(false) {
        problems.push(format!(
            "state not saved: {} ({} unsaved changes)",
            persist["error"].as_str().unwrap_or("unknown error"),
            persist["unsaved_changes"].as_u64().unwrap_or(0)
        ));
    }
    let other = &status["other_key"];
    let senders = other["senders"].as_u64().unwrap_or(0);
    if senders > 0 {
        let addresses: Vec<String> = other["addresses"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|a| a.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        problems.push(format!(
            "hearing {senders} gateway(s) with another key ({}): check the key file on every gateway",
            addresses.join(", ")
        ));
    }
    let counters = &status["counters"];
    if let Some(dropped) = counters["dropped"].as_object() {
        let listed: Vec<String> = dropped
            .iter()
            .filter(|(reason, count)| count.as_u64().unwrap_or(0) > 0 && reason.as_str() != "own")
            .map(|(reason, count)| format!("{reason} {count}"))
            .collect();
        if !listed.is_empty() {
            problems.push(format!("datagrams dropped: {}", listed.join(", ")));
        }
    }
    for name in [
        "send_errors",
        "join_errors",
        "state_write_errors",
        "changes_dropped",
    ] {
        let count = counters[name].as_u64().unwrap_or(0);
        if count > 0 {
            problems.push(format!("{name}: {count}"));
        }
    }
    problems
}

/// `gwsync health`: one line, exit 0 when healthy and 1 when not.
fn health(socket: &Path, min_peers: usize) -> Result<(), Failure> {
    let unhealthy = |why: String| error(format!("unhealthy: {why}"));
    let reply = Connection::open(socket)
        .and_then(|mut connection| connection.call("{\"op\":\"status\"}"))
        .map_err(|failure| unhealthy(failure.message))?;
    let status: Value = field(&reply, "status")
        .and_then(|raw| serde_json::from_str(raw).ok())
        .unwrap_or_default();
    if status["socket_open"] == Value::Bool(false) {
        return Err(unhealthy("no multicast socket open".to_owned()));
    }
    if status["persist"]["ok"] == Value::Bool(false) {
        return Err(unhealthy(format!(
            "state not saved: {}",
            status["persist"]["error"]
                .as_str()
                .unwrap_or("unknown error")
        )));
    }
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    if peers.len() < min_peers {
        return Err(unhealthy(format!(
            "{} gateway(s) heard, at least {min_peers} expected",
            peers.len()
        )));
    }
    let in_sync = if peers.iter().any(|peer| peer["in_sync"].is_boolean()) {
        let count = peers
            .iter()
            .filter(|peer| peer["in_sync"] == Value::Bool(true))
            .count();
        format!(", {count} with the same data")
    } else {
        String::new()
    };
    let newest = peers
        .iter()
        .filter_map(|peer| peer["last_heard_ms_ago"].as_u64())
        .min();
    let heard = match newest {
        Some(ms) => format!(", last heard {}", ago(ms)),
        None => String::new(),
    };
    say(&format!(
        "ok: {} gateway(s) heard{in_sync}{heard}\n",
        peers.len()
    ));
    Ok(())
}

fn genkey() -> Result<(), Failure> {
    let key = gwsync::crypto::GroupKey::generate()
        .map_err(|failure| error(format!("no randomness from the system: {failure}")))?;
    say(&format!("{}\n", key.to_hex()));
    Ok(())
}
