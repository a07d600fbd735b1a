//! Helpers for the daemon tests: real `gwsync` processes, real sockets,
//! and network namespaces joined by a bridge.
//!
//! Nothing here sleeps in place of synchronisation: [`wait_until`] polls a
//! condition until a deadline and fails the test with what it waited for.
#![allow(dead_code)]

pub mod owrt;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_gwsync");

/// The emulator cargo runs this target's programs through, as words
/// (`CARGO_TARGET_<TRIPLE>_RUNNER`, set by ../shared/cross for a cross
/// test); empty on the host.
pub fn runner_argv() -> Vec<String> {
    std::env::vars()
        .find(|(name, _)| name.starts_with("CARGO_TARGET_") && name.ends_with("_RUNNER"))
        .map(|(_, runner)| runner.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The words that run the gwsync binary: under a cross test the binary is
/// for another CPU, so it runs through the runner.
pub fn gwsync_argv() -> Vec<String> {
    let mut argv = runner_argv();
    argv.push(BIN.to_owned());
    argv
}

/// A command that runs a program built for the target CPU: gwsync, or a C
/// program linked with libgwsync.a.
pub fn target_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let runner = runner_argv();
    match runner.split_first() {
        Some((emulator, args)) => {
            let mut command = Command::new(emulator);
            command.args(args).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// A command that runs the gwsync binary (see [`gwsync_argv`]).
pub fn gwsync_command() -> Command {
    target_command(BIN)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique to this process and call, for ports and names.
pub fn unique() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A UDP port for one test: spread by pid so parallel test binaries (and
/// parallel tests in one binary) do not meet on one group.
pub fn unique_port() -> u16 {
    let spread = (std::process::id() % 1_000) * 37 + unique() * 7919;
    20_000 + (spread % 40_000) as u16
}

/// Waits until every daemon of `daemons` holds `key` = `value`.
pub fn wait_all_have(daemons: &[Daemon], key: &str, value: &str, timeout: Duration) {
    for daemon in daemons {
        wait_until(
            &format!("{} has {key} = {value}", daemon.name),
            timeout,
            || daemon.get(key).as_deref() == Some(value),
        );
    }
}

/// Polls `condition` every 20 ms until it holds; panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether this run is CI (env `CI` set and not "0" or "false"): there a
/// missing precondition is a broken job, not a reason to pass.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| !matches!(value.trim(), "" | "0" | "false"))
}

static SKIPPED: AtomicU32 = AtomicU32::new(0);

extern "C" fn print_skip_summary() {
    use std::io::Write;
    let count = SKIPPED.load(Ordering::Relaxed);
    if count > 0 {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {count} test(s) of {} did not run (reasons above; they count as \"ok\" in cargo's summary)",
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned()))
                .unwrap_or_default()
        );
    }
}

/// A test cannot run here for a missing precondition (not root, a tool
/// missing): outside CI it says SKIPPED and why, and the test binary prints
/// how many skipped when it exits; under CI the test fails instead, so a
/// green CI run means every test ran. The caller returns after it.
pub fn skip(why: &str) {
    use std::io::Write;
    assert!(!in_ci(), "cannot run under CI: {why}");
    // Written to the handle: the harness captures `eprintln!` of passing
    // tests, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
    if SKIPPED.fetch_add(1, Ordering::Relaxed) == 0 {
        // SAFETY: registers a plain function with no captured state.
        unsafe { libc::atexit(print_skip_summary) };
    }
}

/// Whether `program --version` runs and succeeds: the test's tool is
/// installed (else the caller skips, naming the package).
pub fn tool_found(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Says that a test cannot run on this platform by its nature (an x86_64-only
/// tool while the test binary runs under the cross emulator, say): a skip
/// even under CI, as opposed to a missing precondition ([`skip`]).
pub fn skip_on_emulator(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED (emulator): {why}");
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "gwsync-test-{}-{}-{tag}",
            std::process::id(),
            unique()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `dir/group.key`, made (mode 0600, a fresh key) the first time it is
/// asked for: the key the daemons of one test directory share.
pub fn group_key_file(dir: &Path) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("group.key");
    if !path.exists() {
        let key = gwsync::crypto::GroupKey::generate().expect("a random key");
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("create the group key file");
        std::io::Write::write_all(&mut file, format!("{}\n", key.to_hex()).as_bytes())
            .expect("write the group key file");
    }
    path
}

/// What a CLI call returned.
#[derive(Debug)]
pub struct CliResult {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

fn cli_result(output: Output) -> CliResult {
    CliResult {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `gwsync ARGS` and returns its exit code and output.
pub fn gwsync(args: &[&str]) -> CliResult {
    cli_result(gwsync_command().args(args).output().expect("run gwsync"))
}

/// One daemon process, killed on drop.
pub struct Daemon {
    pub name: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    netns: Option<String>,
    args: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Starts `gwsync daemon --foreground` with its own socket, state dir and
    /// log file under `dir`, inside `netns` if given, and waits until its
    /// control socket answers.
    pub fn start(dir: &Path, name: &str, netns: Option<&str>, args: &[&str]) -> Daemon {
        let mut daemon = Daemon::spawn(dir, name, netns, args);
        daemon.wait_ready();
        daemon
    }

    /// Like [`Daemon::start`] but does not wait for the control socket.
    pub fn spawn(dir: &Path, name: &str, netns: Option<&str>, args: &[&str]) -> Daemon {
        let mut daemon = Daemon {
            name: name.to_owned(),
            dir: dir.to_owned(),
            socket: dir.join(format!("{name}.sock")),
            state_dir: dir.join(format!("{name}.state")),
            log: dir.join(format!("{name}.log")),
            netns: netns.map(str::to_owned),
            args: args.iter().map(|arg| arg.to_string()).collect(),
            child: None,
        };
        daemon.launch();
        daemon
    }

    fn launch(&mut self) {
        // Daemons refuse to start without a key unless told --open: the
        // daemons of one test directory share one key, so they form a group.
        let mut keying = Vec::new();
        if !self
            .args
            .iter()
            .any(|arg| arg == "--key-file" || arg == "--open")
        {
            keying.push("--key-file".to_owned());
            keying.push(group_key_file(&self.dir).display().to_string());
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = match &self.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns]).args(gwsync_argv());
                command
            }
            None => gwsync_command(),
        };
        command
            .arg("daemon")
            .arg("--foreground")
            .arg("--log-level")
            .arg("debug")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(&self.args)
            .args(&keying)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(command.spawn().expect("start gwsync daemon"));
    }

    pub fn wait_ready(&mut self) {
        let name = self.name.clone();
        wait_until(
            &format!("daemon {name} answers on its control socket"),
            Duration::from_secs(10),
            || {
                if let Some(child) = &mut self.child {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "daemon {name} exited early ({status}); log:\n{}",
                            self.log_text()
                        );
                    }
                }
                self.cli(&["status"]).code == 0
            },
        );
    }

    /// A CLI command against this daemon, to run with other stdio.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = gwsync_command();
        command.arg("--socket").arg(&self.socket).args(args);
        command
    }

    /// Runs a CLI command against this daemon.
    pub fn cli(&self, args: &[&str]) -> CliResult {
        let mut full = vec!["--socket", self.socket.to_str().unwrap()];
        full.extend_from_slice(args);
        gwsync(&full)
    }

    /// `get KEY`'s stdout when it succeeds.
    pub fn get(&self, key: &str) -> Option<String> {
        let result = self.cli(&["get", key]);
        (result.code == 0).then(|| result.stdout.trim_end().to_owned())
    }

    pub fn set(&self, key: &str, json: &str) {
        let result = self.cli(&["set", key, json]);
        assert_eq!(result.code, 0, "set {key} on {}: {result:?}", self.name);
    }

    pub fn status(&self) -> serde_json::Value {
        let result = self.cli(&["status", "--json"]);
        assert_eq!(result.code, 0, "status of {}: {result:?}", self.name);
        serde_json::from_str(&result.stdout).unwrap()
    }

    /// `status` when the daemon answers, `None` when it does not (refused
    /// or gone): for tests of the control socket's own limits.
    pub fn status_raw(&self) -> Option<serde_json::Value> {
        let result = self.cli(&["status", "--json"]);
        (result.code == 0).then(|| serde_json::from_str(&result.stdout).ok())?
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        assert!(status.success(), "{} exited with {status}", self.name);
                        return;
                    }
                    _ if Instant::now() > deadline => {
                        let _ = child.kill();
                        panic!("{} did not stop on SIGTERM", self.name);
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    /// Starts the same daemon again (same socket, state and log).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running daemon");
        self.launch();
        self.wait_ready();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.name, self.log_text());
        }
    }
}

/// Runs a command, failing the test with its output if it fails.
pub fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().expect(program);
    assert!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Creates the namespace `hub` holding the bridge `br0`, up, with
/// multicast snooping off, as netifd configures OpenWrt bridges by default.
pub fn add_hub(hub: &str) {
    run("ip", &["netns", "add", hub]);
    run(
        "ip",
        &[
            "-n",
            hub,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ],
    );
    run("ip", &["-n", hub, "link", "set", "br0", "up"]);
}

/// Network namespaces on one bridge, deleted on drop even when the test
/// fails. The bridge lives in a namespace of its own ("hub"), so the test
/// never touches the host's interfaces.
pub struct Lan {
    pub hub: String,
    pub nodes: Vec<String>,
}

impl Lan {
    /// `None` (after printing why) when not root: namespaces need it.
    pub fn new(test: &str, nodes: usize) -> Option<Lan> {
        if !is_root() {
            skip(&format!(
                "{test}: network namespace tests need root (CI runs them as root)"
            ));
            return None;
        }
        let tag = format!("gw{}x{}", std::process::id() % 100_000, unique());
        let lan = Lan {
            hub: format!("{tag}-hub"),
            nodes: (0..nodes).map(|index| format!("{tag}-n{index}")).collect(),
        };
        add_hub(&lan.hub);
        for node in &lan.nodes {
            run("ip", &["netns", "add", node]);
            run("ip", &["-n", node, "link", "set", "lo", "up"]);
        }
        Some(lan)
    }

    /// Connects node `index` to the bridge as `eth0` (with an IPv4
    /// link-local address unless `ipv4` is false) and brings it up.
    pub fn connect(&self, index: usize, ipv4: bool) {
        let node = &self.nodes[index];
        let hub_end = format!("vh{index}");
        run(
            "ip",
            &[
                "-n", &self.hub, "link", "add", &hub_end, "type", "veth", "peer", "name", "eth0",
                "netns", node,
            ],
        );
        run(
            "ip",
            &[
                "-n", &self.hub, "link", "set", &hub_end, "master", "br0", "up",
            ],
        );
        if ipv4 {
            let address = format!("{}/24", self.ipv4(index));
            run("ip", &["-n", node, "addr", "add", &address, "dev", "eth0"]);
        }
        run("ip", &["-n", node, "link", "set", "eth0", "up"]);
    }

    /// The IPv4 address [`Lan::connect`] gives node `index`.
    pub fn ipv4(&self, index: usize) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(169, 254, 73, index as u8 + 1)
    }

    /// Runs `work` on a thread inside node `index`'s network namespace and
    /// returns its result: a socket it opens stays in that namespace, so
    /// the test itself can act as a host on the LAN.
    pub fn in_node<T: Send>(&self, index: usize, work: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.nodes[index]);
        let netns = File::open(&path).unwrap_or_else(|error| panic!("open {path}: {error}"));
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: a plain syscall on a descriptor we hold; it
                    // moves only this short-lived thread, not the test's.
                    let moved = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(
                        moved,
                        0,
                        "setns into {path}: {}",
                        std::io::Error::last_os_error()
                    );
                    work()
                })
                .join()
                .expect("the thread in the namespace panicked")
        })
    }

    /// Starts `gw{index}` in node `index` on its `eth0`, group port `port`,
    /// with `extra` arguments; its files live in `dir`.
    pub fn start(&self, index: usize, dir: &Path, port: u16, extra: &[&str]) -> Daemon {
        let port = port.to_string();
        let mut args = vec!["--interface", "eth0", "--port", &port];
        args.extend_from_slice(extra);
        Daemon::start(dir, &format!("gw{index}"), Some(&self.nodes[index]), &args)
    }

    /// [`Lan::start`] in every node.
    pub fn start_all(&self, dir: &Path, port: u16, extra: &[&str]) -> Vec<Daemon> {
        (0..self.nodes.len())
            .map(|index| self.start(index, dir, port, extra))
            .collect()
    }

    /// A LAN with every node's link up, where most tests start.
    pub fn connected(test: &str, nodes: usize) -> Option<Lan> {
        let lan = Lan::new(test, nodes)?;
        lan.connect_all();
        Some(lan)
    }

    pub fn connect_all(&self) {
        for index in 0..self.nodes.len() {
            self.connect(index, true);
        }
    }

    pub fn link(&self, index: usize, up: bool) {
        run(
            "ip",
            &[
                "-n",
                &self.nodes[index],
                "link",
                "set",
                "eth0",
                if up { "up" } else { "down" },
            ],
        );
    }

    /// Drops `percent` % of incoming sync datagrams in node `index`.
    pub fn inject_loss(&self, index: usize, percent: u32, port: u16) {
        let node = &self.nodes[index];
        let rule = format!("udp dport {port} numgen random mod 100 < {percent} drop");
        run(
            "ip",
            &[
                "netns", "exec", node, "nft", "add", "table", "inet", "gwloss",
            ],
        );
        run(
            "ip",
            &[
                "netns",
                "exec",
                node,
                "nft",
                "add chain inet gwloss input { type filter hook input priority 0; }",
            ],
        );
        let mut args = vec![
            "netns", "exec", node, "nft", "add", "rule", "inet", "gwloss", "input",
        ];
        args.extend(rule.split(' '));
        run("ip", &args);
    }

    /// Waits until no IPv6 address of node `index` is still tentative (DAD).
    pub fn wait_ipv6_ready(&self, index: usize) {
        let node = self.nodes[index].clone();
        wait_until(
            &format!("{node} has a usable IPv6 link-local address"),
            Duration::from_secs(10),
            || {
                let output = Command::new("ip")
                    .args(["-n", &node, "-6", "addr", "show", "dev", "eth0"])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&output.stdout);
                text.contains("fe80::") && !text.contains("tentative")
            },
        );
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for node in self.nodes.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "del", node]).output();
        }
    }
}
