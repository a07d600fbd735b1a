//! The daemon as the ubus object `gwsync`, against OpenWrt 24.10's real
//! ubusd, `ubus` CLI, libubus, procd, rpcd and uhttpd (built from source by
//! ../shared/openwrt-userland and ../shared/openwrt-luci, tests/common/owrt.rs).
//! The first tests run ubusd on the host, one per gateway, with the daemons
//! in network namespaces; the last ones boot routers with procd as PID 1.
//! Needs root; skips with a message without it and under the cross
//! emulator (the userland is an x86_64 build).

#![cfg(feature = "ubus")]

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::owrt::{self, Flavor, Net, Router};
use common::{Daemon, Lan, TempDir, gwsync, unique_port, wait_until};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(20);

/// OpenWrt's userland programs run on the host, from a private copy of
/// the prebuilt rootfs (tests/common/owrt.rs builds it when absent).
struct Userland {
    /// Keeps the private rootfs copy.
    _copy: Router,
    root: PathBuf,
    stage: PathBuf,
}

impl Userland {
    fn find(test: &str) -> Option<Userland> {
        let router = Router::new(test, Flavor::Base)?;
        Some(Userland {
            root: router.root().to_owned(),
            stage: owrt::cache_dir().join("stage"),
            _copy: router,
        })
    }

    /// A program of the userland, run on the host with its libraries.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.root.join(program));
        command.env("LD_LIBRARY_PATH", self.library_path());
        command
    }

    fn library_path(&self) -> String {
        ["lib", "usr/lib", "lib/x86_64-linux-gnu"]
            .map(|dir| self.root.join(dir).display().to_string())
            .join(":")
    }
}

/// ubusd on a private socket, killed on drop.
struct Ubusd {
    child: Child,
    socket: PathBuf,
}

impl Ubusd {
    fn start(owrt: &Userland, socket: &Path) -> Ubusd {
        let child = owrt
            .command("sbin/ubusd")
            .arg("-s")
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ubusd");
        wait_until("ubusd listens", TIMEOUT, || socket.exists());
        Ubusd {
            child,
            socket: socket.to_owned(),
        }
    }

    /// Kills ubusd and removes its socket, so a successor's shows when it
    /// is listening.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Ubusd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A background `ubus listen`/`subscribe`, its output in a file.
struct Watcher {
    child: Child,
    out: PathBuf,
}

impl Watcher {
    fn start(owrt: &Userland, socket: &Path, out: &Path, args: &[&str]) -> Watcher {
        let child = owrt
            .command("bin/ubus")
            .arg("-s")
            .arg(socket)
            .args(args)
            .stdout(File::create(out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ubus listen");
        Watcher {
            child,
            out: out.to_owned(),
        }
    }

    /// One JSON object per line, as `ubus listen` prints them.
    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The `gwsync.change` events seen so far.
    fn changes(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter_map(|line| line.get("gwsync.change").cloned())
            .collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ubus listen gwsync.change` and waits until it is attached: it
/// also listens for a test event, sent until it shows up.
fn listen(owrt: &Userland, socket: &Path, out: &Path) -> Watcher {
    let watcher = Watcher::start(
        owrt,
        socket,
        out,
        &["listen", "gwsync.change", "gwsync.test"],
    );
    wait_until("ubus listen is attached", TIMEOUT, || {
        ubus(owrt, socket, &["send", "gwsync.test", "{}"]);
        watcher
            .lines()
            .iter()
            .any(|line| line.get("gwsync.test").is_some())
    });
    watcher
}

/// Runs the `ubus` CLI: the ubus status code (the CLI exits with its
/// negation) and the reply it printed.
fn ubus(owrt: &Userland, socket: &Path, args: &[&str]) -> (u32, Value) {
    let output: Output = owrt
        .command("bin/ubus")
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .expect("run ubus");
    let code = output.status.code().expect("ubus exited by a signal") as u32;
    let status = (256 - code) % 256;
    let reply = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (status, reply)
}

fn key_file(dir: &Path) -> String {
    let path = dir.join("group.key");
    std::fs::write(&path, gwsync(&["genkey"]).stdout).unwrap();
    path.display().to_string()
}

/// One keyed gateway on loopback with its own ubusd, its object published.
fn one_gateway_on_lo(owrt: &Userland, dir: &Path) -> (Ubusd, Daemon) {
    let bus = Ubusd::start(owrt, &dir.join("ubus.sock"));
    let key = key_file(dir);
    let daemon = start_daemon(dir, "gw", None, "lo", unique_port(), &bus.socket, &key);
    wait_for_object(owrt, &bus.socket);
    (bus, daemon)
}

fn start_daemon(
    dir: &Path,
    name: &str,
    netns: Option<&str>,
    iface: &str,
    port: u16,
    ubus_socket: &Path,
    key: &str,
) -> Daemon {
    let port = port.to_string();
    let ubus_socket = ubus_socket.display().to_string();
    Daemon::start(
        dir,
        name,
        netns,
        &[
            "--interface",
            iface,
            "--port",
            &port,
            "--key-file",
            key,
            "--ubus-socket",
            &ubus_socket,
        ],
    )
}

fn wait_for_object(owrt: &Userland, socket: &Path) {
    wait_until("the object gwsync is on ubus", TIMEOUT, || {
        ubus(owrt, socket, &["list", "gwsync"]).0 == 0
    });
}

const OK: u32 = 0;
const INVALID_ARGUMENT: u32 = 2;
const METHOD_NOT_FOUND: u32 = 3;
const NOT_FOUND: u32 = 4;
const UNKNOWN_ERROR: u32 = 9;

#[test]
fn every_method_through_the_ubus_cli_with_its_status_codes() {
    let Some(owrt) = Userland::find("every_method_through_the_ubus_cli") else {
        return;
    };
    let dir = TempDir::new("ubus-cli");
    let (bus, daemon) = one_gateway_on_lo(&owrt, dir.path());
    let call =
        |method: &str, args: &str| ubus(&owrt, &bus.socket, &["call", "gwsync", method, args]);
    let node_id = daemon.status()["node_id"].as_str().unwrap().to_owned();

    // set and get: the value is any JSON, stored as the CLI wrote it.
    const VALUE: &str =
        r#"{"lights":"dim","level":40,"rooms":["tv","hall"],"on":true,"note":null}"#;
    let value =
        json!({"lights": "dim", "level": 40, "rooms": ["tv", "hall"], "on": true, "note": null});
    let (status, reply) = call(
        "set",
        &format!(r#"{{"key":"scene/movie","value":{VALUE}}}"#),
    );
    assert_eq!((status, reply), (OK, json!({})));
    let (status, got) = call("get", r#"{"key":"scene/movie"}"#);
    assert_eq!(status, OK);
    assert_eq!(got["key"], "scene/movie");
    assert_eq!(got["value"], value);
    assert_eq!(got["origin"], node_id.as_str());
    assert_eq!(got["version"].as_str().map(str::len), Some(16), "{got}");
    assert_eq!(
        daemon.get("scene/movie").as_deref(),
        Some(VALUE),
        "member order survives the blobmsg round trip"
    );

    // What the control socket writes, ubus reads.
    daemon.set("scene/away", r#""off""#);
    daemon.set("home/1", r#"{"name":"flat"}"#);
    assert_eq!(call("get", r#"{"key":"scene/away"}"#).1["value"], "off");

    let (status, listed) = call("list", r#"{"prefix":"scene/"}"#);
    assert_eq!(
        (status, listed),
        (
            OK,
            json!({"keys": ["scene/away", "scene/movie"], "total": 2})
        )
    );
    let (_, page) = call("list", r#"{"prefix":"scene/","offset":1,"limit":1}"#);
    assert_eq!(page, json!({"keys": ["scene/movie"], "total": 2}));
    assert_eq!(call("list", "{}").1["total"], 3);
    // null is "not given", as JSON clients such as LuCI send it.
    let (_, all) = call("list", r#"{"prefix":null,"offset":null,"limit":null}"#);
    assert_eq!(all["total"], 3);
    assert_eq!(call("get", r#"{"key":null}"#).0, INVALID_ARGUMENT);

    let (status, dump) = call("dump", "{}");
    assert_eq!(status, OK);
    assert_eq!(dump["entries"]["home/1"], json!({"name": "flat"}));
    assert_eq!(
        dump["entries"].as_object().map(|entries| entries.len()),
        Some(3)
    );

    let (status, state) = call("status", "{}");
    assert_eq!(status, OK);
    assert_eq!(state["node_id"], node_id.as_str());
    assert_eq!(state["live_entries"], 3);

    let summaries = state["counters"]["summaries_sent"].as_u64().unwrap();
    assert_eq!(call("trigger", r#"{"reason":"manual"}"#), (OK, json!({})));
    assert_eq!(call("trigger", "{}").0, OK);
    wait_until("a triggered sync request went out", TIMEOUT, || {
        daemon.status()["counters"]["summaries_sent"]
            .as_u64()
            .unwrap()
            > summaries
    });

    // reload re-reads the key file; a broken one is refused, keys stay.
    assert_eq!(call("reload", "{}"), (OK, json!({})));
    std::fs::write(dir.path().join("group.key"), "not a key\n").unwrap();
    let (status, reply) = call("reload", "{}");
    assert_eq!(status, UNKNOWN_ERROR, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|message| !message.is_empty()),
        "{reply}"
    );
    assert_eq!(daemon.status()["key_state"], "keyed");

    assert_eq!(call("del", r#"{"key":"scene/away"}"#), (OK, json!({})));
    assert_eq!(call("get", r#"{"key":"scene/away"}"#).0, NOT_FOUND);
    assert_eq!(daemon.get("scene/away"), None);

    // Bad arguments: the status code, and the reason as the reply body.
    let oversized = json!({"key": "big", "value": "x".repeat(70_000)}).to_string();
    for (method, args, expected, says) in [
        ("get", "{}", INVALID_ARGUMENT, "missing \"key\""),
        ("get", r#"{"key":5}"#, INVALID_ARGUMENT, "must be a string"),
        ("get", r#"{"key":"nope"}"#, NOT_FOUND, "not found"),
        (
            "set",
            r#"{"key":"x"}"#,
            INVALID_ARGUMENT,
            "missing \"value\"",
        ),
        ("set", r#"{"value":1}"#, INVALID_ARGUMENT, "missing \"key\""),
        (
            "set",
            r#"{"key":["x"],"value":1}"#,
            INVALID_ARGUMENT,
            "must be a string",
        ),
        ("set", r#"{"key":"","value":1}"#, INVALID_ARGUMENT, "key"),
        ("set", &oversized, INVALID_ARGUMENT, "too large"),
        ("del", r#"{"key":"nope"}"#, NOT_FOUND, "not found"),
        ("list", r#"{"offset":-1}"#, INVALID_ARGUMENT, "non-negative"),
        (
            "list",
            r#"{"limit":"ten"}"#,
            INVALID_ARGUMENT,
            "non-negative",
        ),
        (
            "trigger",
            r#"{"reason":"bogus"}"#,
            INVALID_ARGUMENT,
            "unknown trigger reason",
        ),
        ("explode", "{}", METHOD_NOT_FOUND, "no method"),
    ] {
        let (status, reply) = call(method, args);
        let shown: String = args.chars().take(60).collect();
        assert_eq!(status, expected, "{method} {shown}: {reply}");
        let message = reply["error"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{method} {shown}: {reply}");
    }
    assert_eq!(daemon.get("big"), None, "a refused value is not stored");

    // A NUL in a string cannot cross ubus (blobmsg strings end at one).
    daemon.set("nul", r#""a\u0000b""#);
    let (status, reply) = call("get", r#"{"key":"nul"}"#);
    assert_eq!(status, UNKNOWN_ERROR, "{reply}");
    assert!(
        reply["error"].as_str().unwrap_or_default().contains("NUL"),
        "{reply}"
    );
    assert_eq!(daemon.get("x"), None);
}

#[test]
fn a_reply_over_ubusds_message_limit_is_an_error_and_the_object_stays() {
    let Some(owrt) = Userland::find("a_reply_over_ubusds_message_limit") else {
        return;
    };
    let dir = TempDir::new("ubus-large");
    let (bus, daemon) = one_gateway_on_lo(&owrt, dir.path());
    // 18 values of 60 KiB: each fits, the whole dump (1.08 MB) does not fit
    // ubusd's 1 MiB message limit.
    let big = format!("\"{}\"", "v".repeat(60 * 1024));
    for index in 0..18 {
        daemon.set(&format!("bulk/{index:02}"), &big);
    }
    let call =
        |method: &str, args: &str| ubus(&owrt, &bus.socket, &["call", "gwsync", method, args]);
    let (status, reply) = call("dump", "{}");
    assert_eq!(status, UNKNOWN_ERROR, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("too large"),
        "{reply}"
    );
    // ubusd kept the connection: the object still answers, and paging works.
    let (status, page) = call("list", r#"{"prefix":"bulk/","offset":17}"#);
    assert_eq!(
        (status, page),
        (OK, json!({"keys": ["bulk/17"], "total": 18}))
    );
    let (status, one) = call("get", r#"{"key":"bulk/17"}"#);
    assert_eq!(status, OK);
    assert_eq!(one["value"].as_str().map(str::len), Some(60 * 1024));
}

#[test]
fn the_daemon_runs_without_ubusd_and_publishes_once_ubusd_appears() {
    let Some(owrt) = Userland::find("the_daemon_runs_without_ubusd") else {
        return;
    };
    let dir = TempDir::new("ubus-late");
    let socket = dir.path().join("ubus.sock");
    let key = key_file(dir.path());
    // No ubusd at all, as on plain Linux: the daemon works as ever.
    let daemon = start_daemon(dir.path(), "gw", None, "lo", unique_port(), &socket, &key);
    daemon.set("early/1", "1");
    assert_eq!(daemon.get("early/1").as_deref(), Some("1"));
    let _bus = Ubusd::start(&owrt, &socket);
    wait_for_object(&owrt, &socket);
    let (status, got) = ubus(
        &owrt,
        &socket,
        &["call", "gwsync", "get", r#"{"key":"early/1"}"#],
    );
    assert_eq!((status, got["value"].clone()), (OK, json!(1)));
}

#[test]
fn a_second_daemon_on_one_ubusd_is_refused_and_takes_over_when_the_first_stops() {
    let Some(owrt) = Userland::find("a_second_daemon_on_one_ubusd") else {
        return;
    };
    let dir = TempDir::new("ubus-second");
    let bus = Ubusd::start(&owrt, &dir.path().join("ubus.sock"));
    let key = key_file(dir.path());
    let port = unique_port();
    let mut first = start_daemon(dir.path(), "first", None, "lo", port, &bus.socket, &key);
    wait_for_object(&owrt, &bus.socket);
    let second = start_daemon(dir.path(), "second", None, "lo", port, &bus.socket, &key);
    wait_until("the second daemon says ubusd refused it", TIMEOUT, || {
        second.log_text().contains("refused the object gwsync")
    });
    let owner = || ubus(&owrt, &bus.socket, &["call", "gwsync", "status"]).1["node_id"].clone();
    assert_eq!(owner(), first.status()["node_id"]);
    let successor = second.status()["node_id"].clone();
    first.terminate();
    wait_until("the second daemon owns the object", TIMEOUT, || {
        owner() == successor
    });
}

#[test]
fn subscribers_get_change_notifications() {
    let Some(owrt) = Userland::find("subscribers_get_change_notifications") else {
        return;
    };
    let dir = TempDir::new("ubus-subscribe");
    let (bus, daemon) = one_gateway_on_lo(&owrt, dir.path());
    let subscriber = Watcher::start(
        &owrt,
        &bus.socket,
        &dir.path().join("sub.out"),
        &["subscribe", "gwsync"],
    );
    // The subscription is in place once a write shows up as a notification.
    let mut writes = 0;
    wait_until("ubus subscribe gets a change notification", TIMEOUT, || {
        writes += 1;
        daemon.set("sub/probe", &writes.to_string());
        subscriber
            .lines()
            .iter()
            .any(|line| line.get("change").is_some())
    });
    let last = daemon.status()["node_id"].as_str().unwrap().to_owned();
    daemon.cli(&["del", "sub/probe"]);
    wait_until("the delete is notified", TIMEOUT, || {
        subscriber
            .lines()
            .last()
            .and_then(|line| line.get("change").cloned())
            == Some(json!({"key": "sub/probe", "deleted": true, "origin": last}))
    });
}

#[test]
fn listen_sees_local_and_remote_changes_in_order_on_two_gateways() {
    let Some(owrt) = Userland::find("listen_sees_local_and_remote_changes_in_order") else {
        return;
    };
    let Some(lan) = Lan::connected("listen_sees_local_and_remote_changes_in_order", 2) else {
        return;
    };
    let dir = TempDir::new("ubus-listen");
    let key = key_file(dir.path());
    let port = unique_port();
    let buses: Vec<Ubusd> = (0..2)
        .map(|index| Ubusd::start(&owrt, &dir.path().join(format!("ubus{index}.sock"))))
        .collect();
    let daemons: Vec<Daemon> = (0..2)
        .map(|index| {
            start_daemon(
                dir.path(),
                &format!("gw{index}"),
                Some(&lan.nodes[index]),
                "eth0",
                port,
                &buses[index].socket,
                &key,
            )
        })
        .collect();
    let ids: Vec<String> = daemons
        .iter()
        .map(|daemon| daemon.status()["node_id"].as_str().unwrap().to_owned())
        .collect();
    for bus in &buses {
        wait_for_object(&owrt, &bus.socket);
    }
    let listeners: Vec<Watcher> = buses
        .iter()
        .enumerate()
        .map(|(index, bus)| {
            listen(
                &owrt,
                &bus.socket,
                &dir.path().join(format!("listen{index}.out")),
            )
        })
        .collect();

    // Writes alternate between the gateways and between ubus and the CLI;
    // each is awaited on both buses before the next, so the order is defined.
    let call = |index: usize, method: &str, args: Value| {
        let (status, reply) = ubus(
            &owrt,
            &buses[index].socket,
            &["call", "gwsync", method, &args.to_string()],
        );
        assert_eq!(status, OK, "{method} {args}: {reply}");
    };
    let steps: Vec<(Box<dyn Fn()>, Value)> = vec![
        (
            Box::new(|| call(0, "set", json!({"key": "scene/1", "value": {"v": 1}}))),
            json!({"key": "scene/1", "value": {"v": 1}, "origin": ids[0]}),
        ),
        (
            Box::new(|| call(1, "set", json!({"key": "scene/2", "value": [2]}))),
            json!({"key": "scene/2", "value": [2], "origin": ids[1]}),
        ),
        (
            Box::new(|| daemons[1].set("scene/1", r#"{"v":3}"#)),
            json!({"key": "scene/1", "value": {"v": 3}, "origin": ids[1]}),
        ),
        (
            Box::new(|| call(0, "del", json!({"key": "scene/2"}))),
            json!({"key": "scene/2", "deleted": true, "origin": ids[0]}),
        ),
        (
            Box::new(|| call(1, "del", json!({"key": "scene/1"}))),
            json!({"key": "scene/1", "deleted": true, "origin": ids[1]}),
        ),
    ];
    let mut expected = Vec::new();
    for (write, event) in steps {
        write();
        expected.push(event);
        for (index, listener) in listeners.iter().enumerate() {
            wait_until(
                &format!("gw{index}'s bus shows {} changes", expected.len()),
                TIMEOUT,
                || listener.changes().len() >= expected.len(),
            );
        }
    }
    for listener in &listeners {
        assert_eq!(listener.changes(), expected);
    }
}

#[test]
fn a_c_program_with_libubus_calls_get_and_set_and_receives_events() {
    let Some(owrt) = Userland::find("a_c_program_with_libubus") else {
        return;
    };
    let dir = TempDir::new("ubus-c");
    let program = dir.path().join("ubus_client");
    let include = owrt.stage.join("usr/include");
    let compiled = Command::new("cc")
        .arg("-Wall")
        .arg("-Werror")
        .arg(format!("-I{}", include.display()))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/ubus_client.c"))
        .arg("-o")
        .arg(&program)
        .arg(format!("-L{}", owrt.root.join("lib").display()))
        .args(["-lubus", "-lubox", "-lblobmsg_json", "-ljson-c"])
        .output()
        .expect("run cc");
    assert!(
        compiled.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let (bus, daemon) = one_gateway_on_lo(&owrt, dir.path());

    let output = Command::new(&program)
        .env("LD_LIBRARY_PATH", owrt.library_path())
        .arg(&bus.socket)
        .arg("c/hello")
        .arg(r#"{"from":"c","n":7}"#)
        .output()
        .expect("run the C client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "C client failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = |prefix: &str| -> Value {
        let text = stdout
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {stdout}"));
        serde_json::from_str(text).unwrap()
    };
    assert_eq!(line("get: ")["value"], json!({"from": "c", "n": 7}));
    assert_eq!(
        line("event: "),
        json!({"key": "c/hello", "value": {"from": "c", "n": 7}, "origin": daemon.status()["node_id"]})
    );
    assert!(stdout.contains("get missing: 4 Not found"), "{stdout}");
    assert_eq!(
        daemon.get("c/hello").as_deref(),
        Some(r#"{"from":"c","n":7}"#)
    );
}

#[test]
fn after_ubusd_restarts_the_object_returns_and_no_change_event_is_lost() {
    let Some(owrt) = Userland::find("after_ubusd_restarts_the_object_returns") else {
        return;
    };
    let dir = TempDir::new("ubus-restart");
    let socket = dir.path().join("ubus.sock");
    let mut bus = Ubusd::start(&owrt, &socket);
    let key = key_file(dir.path());
    let daemon = start_daemon(dir.path(), "gw", None, "lo", unique_port(), &socket, &key);
    wait_for_object(&owrt, &socket);
    let origin = daemon.status()["node_id"].clone();

    bus.kill();
    // Changed while ubusd is away: held, sent once the object is back.
    daemon.set("outage/1", "1");
    daemon.set("outage/2", "2");
    // Paused while ubusd comes back and a listener attaches, so the
    // listener is surely there before gwsync re-registers.
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let restarted = Ubusd::start(&owrt, &socket);
    let listener = listen(&owrt, &socket, &dir.path().join("listen.out"));
    let back = std::time::Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_until(
        "the object is back on the restarted ubusd",
        Duration::from_secs(10),
        || ubus(&owrt, &socket, &["list", "gwsync"]).0 == OK,
    );
    println!(
        "object back {} ms after the daemon resumed",
        back.elapsed().as_millis()
    );

    // After the restart: ubus and CLI writes, all seen, in order.
    for index in 3..=6 {
        if index % 2 == 0 {
            daemon.set(&format!("outage/{index}"), &index.to_string());
        } else {
            let args = json!({"key": format!("outage/{index}"), "value": index}).to_string();
            assert_eq!(
                ubus(&owrt, &socket, &["call", "gwsync", "set", &args]).0,
                OK
            );
        }
    }
    let expected: Vec<Value> = (1..=6)
        .map(|index| json!({"key": format!("outage/{index}"), "value": index, "origin": origin}))
        .collect();
    wait_until("all six changes are seen", TIMEOUT, || {
        listener.changes().len() >= expected.len()
    });
    assert_eq!(listener.changes(), expected);
    drop(restarted);
}

// ------------------------------------------------------- routers under procd

/// A router with the package installed as an image has it, a group key in
/// uci `key_file`, the `extra` init scripts enabled, booted, and the object
/// `gwsync` on its ubus.
fn router_with_gwsync(test: &str, flavor: Flavor, net: Net, extra: &[&str]) -> Option<Router> {
    let mut router = Router::new(test, flavor)?;
    router.install_package();
    router.enable_installed();
    router.write("etc/gwsync.key", &gwsync(&["genkey"]).stdout);
    let mut script = "chmod 600 /etc/gwsync.key && uci set gwsync.main.key_file=/etc/gwsync.key \
                      && uci commit gwsync"
        .to_owned();
    for service in extra {
        script.push_str(&format!(" && /etc/init.d/{service} enable"));
    }
    let result = router.chroot(&script);
    assert_eq!(result.code, 0, "configure the router: {result:?}");
    router.boot(net);
    router.wait_for("the object gwsync is on ubus", TIMEOUT, "ubus list gwsync");
    Some(router)
}

/// `ubus listen gwsync.change` in the background on the router, writing to
/// `file` (on the router); returns once it is attached.
fn router_listen(router: &Router, file: &str) {
    router.sh_ok(&format!(
        "ubus listen gwsync.change gwsync.test > {file} 2>&1 < /dev/null &"
    ));
    router.wait_for(
        "ubus listen is attached",
        TIMEOUT,
        &format!("ubus send gwsync.test '{{}}'; grep -q gwsync.test {file}"),
    );
}

fn router_changes(router: &Router, file: &str) -> Vec<Value> {
    router
        .sh_ok(&format!("cat {file}"))
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|line| line.get("gwsync.change").cloned())
        .collect()
}

#[test]
fn procd_restarts_a_killed_ubusd_and_the_object_returns_losing_no_event() {
    let test = "procd_restarts_a_killed_ubusd_and_the_object_returns";
    let Some(router) = router_with_gwsync(test, Flavor::Base, Net::Alone, &[]) else {
        return;
    };
    let origin = router
        .sh_ok("ubus call gwsync status | jsonfilter -e '@.node_id'")
        .trim()
        .to_owned();
    let old_ubusd = router.sh_ok("pidof ubusd").trim().to_owned();
    // The daemon pauses while ubusd dies and comes back and a listener
    // attaches, so that listener is surely there when gwsync returns.
    router.sh_ok("kill -STOP $(pidof gwsync) && kill $(pidof ubusd)");
    router.wait_for(
        "procd respawned ubusd",
        TIMEOUT,
        &format!("p=$(pidof ubusd) && [ \"$p\" != {old_ubusd} ] && ubus list > /dev/null"),
    );
    router_listen(&router, "/tmp/listen.out");
    let resumed = std::time::Instant::now();
    router.sh_ok("kill -CONT $(pidof gwsync) && gwsync set outage/1 1");
    router.wait_for(
        "the object is back on the new ubusd",
        Duration::from_secs(10),
        "ubus list gwsync",
    );
    println!(
        "object back on the respawned ubusd {} ms after the daemon resumed",
        resumed.elapsed().as_millis()
    );
    for index in 2..=6 {
        if index % 2 == 0 {
            router.sh_ok(&format!(
                "ubus call gwsync set '{{\"key\":\"outage/{index}\",\"value\":{index}}}'"
            ));
        } else {
            router.sh_ok(&format!("gwsync set outage/{index} {index}"));
        }
    }
    let expected: Vec<Value> = (1..=6)
        .map(|index| json!({"key": format!("outage/{index}"), "value": index, "origin": origin}))
        .collect();
    router.wait_for(
        "six change events",
        TIMEOUT,
        "[ $(grep -c gwsync.change /tmp/listen.out) -ge 6 ]",
    );
    assert_eq!(router_changes(&router, "/tmp/listen.out"), expected);
}

/// rpcd logins: `reader` is granted the ACL group gwsync-read, `writer`
/// gwsync-write (md5-crypt hashes of "reader-pw" and "writer-pw").
const RPCD_CONFIG: &str = "config rpcd
\toption socket /var/run/ubus/ubus.sock
\toption timeout 30

config login
\toption username 'reader'
\toption password '$1$gwsyncrd$PKyAfe1SwenAKCHk0EjUo0'
\tlist read 'gwsync-read'

config login
\toption username 'writer'
\toption password '$1$gwsyncwr$7I1nKtPxlz3MmAwiREIkl1'
\tlist read 'gwsync-write'
\tlist write 'gwsync-write'
";

#[test]
fn an_rpcd_session_with_the_read_only_group_can_get_but_not_set() {
    let test = "an_rpcd_session_with_the_read_only_group";
    let Some(router) = router_with_gwsync(test, Flavor::Luci, Net::Alone, &["rpcd"]) else {
        return;
    };
    assert!(
        router.path("/usr/share/rpcd/acl.d/gwsync.json").exists(),
        "the package installs the ACL"
    );
    // rpcd reads its logins from uci at each login.
    router.write("etc/config/rpcd", RPCD_CONFIG);
    router.wait_for("rpcd serves sessions", TIMEOUT, "ubus list session");
    router.sh_ok("gwsync set acl/x '{\"n\":1}'");
    // uhttpd's JSON-RPC endpoint is how LuCI calls ubus with a session.
    router.sh_ok("uhttpd -p 127.0.0.1:8080 -h /www -u /ubus");
    router.wait_for(
        "uhttpd answers",
        TIMEOUT,
        "wget -q -O /dev/null http://127.0.0.1:8080/",
    );
    let session = |user: &str| -> String {
        let result = router.sh(&format!(
            "ubus call session login '{{\"username\":\"{user}\",\"password\":\"{user}-pw\"}}'"
        ));
        let reply: Value = serde_json::from_str(&result.stdout)
            .unwrap_or_else(|_| panic!("{user} cannot log in: {result:?}"));
        reply["ubus_rpc_session"]
            .as_str()
            .unwrap_or_else(|| panic!("{user}: no session in {reply} ({result:?})"))
            .to_owned()
    };
    let access = |sid: &str, function: &str| -> Value {
        let reply = router.sh_ok(&format!(
            "ubus call session access '{{\"ubus_rpc_session\":\"{sid}\",\"scope\":\"ubus\",\"object\":\"gwsync\",\"function\":\"{function}\"}}'"
        ));
        serde_json::from_str::<Value>(&reply).unwrap()["access"].clone()
    };
    let rpc = |sid: &str, method: &str, args: Value| -> Value {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "call", "params": [sid, "gwsync", method, args]});
        let reply = router.sh_ok(&format!(
            "wget -q -O - --header 'Content-Type: application/json' --post-data '{body}' http://127.0.0.1:8080/ubus"
        ));
        serde_json::from_str(&reply).unwrap_or_else(|_| panic!("not JSON: {reply}"))
    };

    let reader = session("reader");
    assert!(!reader.is_empty());
    for function in ["get", "list", "dump", "status"] {
        assert_eq!(access(&reader, function), true, "reader may {function}");
    }
    for function in ["set", "del", "trigger", "reload"] {
        assert_eq!(
            access(&reader, function),
            false,
            "reader may not {function}"
        );
    }
    let got = rpc(&reader, "get", json!({"key": "acl/x"}));
    assert_eq!(got["result"][0], 0, "{got}");
    assert_eq!(got["result"][1]["value"], json!({"n": 1}), "{got}");
    let denied = rpc(&reader, "set", json!({"key": "acl/x", "value": 2}));
    assert_eq!(denied["error"]["message"], "Access denied", "{denied}");
    let denied = rpc(&reader, "del", json!({"key": "acl/x"}));
    assert_eq!(denied["error"]["message"], "Access denied", "{denied}");
    assert_eq!(
        router.sh_ok("gwsync get acl/x").trim(),
        r#"{"n":1}"#,
        "a denied call changes nothing"
    );

    let writer = session("writer");
    assert_eq!(access(&writer, "set"), true);
    let set = rpc(&writer, "set", json!({"key": "acl/x", "value": 2}));
    assert_eq!(set["result"][0], 0, "{set}");
    assert_eq!(router.sh_ok("gwsync get acl/x").trim(), "2");
}
