//! The daemon as the ubus object `gwsync`, against OpenWrt 24.10's real
//! ubusd, `ubus` CLI and libubus (built by ../shared/openwrt-luci/build.sh,
//! run from its rootfs). Needs root (the userland build, namespaces); skips
//! with a message without it.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{Daemon, Lan, TempDir, gwsync, unique_port, wait_until};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(20);

/// The prebuilt OpenWrt userland, built here (under a lock, shared with
/// every other test) when absent.
struct Userland {
    root: PathBuf,
    stage: PathBuf,
}

impl Userland {
    fn find(test: &str) -> Option<Userland> {
        if !common::is_root() {
            common::skip(&format!(
                "{test}: the OpenWrt userland tests need root (CI runs them as root)"
            ));
            return None;
        }
        let dir = PathBuf::from(
            std::env::var("GWSYNC_OWRT_DIR").unwrap_or_else(|_| "/tmp/owrt-luci".to_owned()),
        );
        if !dir.join("luci-rootfs/usr/sbin/uhttpd").exists() {
            let shared = std::env::var("GWSYNC_SHARED_DIR").map_or_else(
                |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
                PathBuf::from,
            );
            let lock = format!("{}.lock", dir.display());
            let status = Command::new("flock")
                .arg(&lock)
                .arg(shared.join("openwrt-luci/build.sh"))
                .env("OWRT", &dir)
                .status();
            if !matches!(status, Ok(status) if status.success()) {
                common::skip(&format!(
                    "{test}: building the OpenWrt userland into {} failed ({status:?})",
                    dir.display()
                ));
                return None;
            }
        }
        Some(Userland {
            root: dir.join("rootfs"),
            stage: dir.join("stage"),
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

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

#[test]
fn every_method_through_the_ubus_cli_with_its_status_codes() {
    let Some(owrt) = Userland::find("every_method_through_the_ubus_cli") else {
        return;
    };
    let dir = TempDir::new("ubus-cli");
    let bus = Ubusd::start(&owrt, &dir.path().join("ubus.sock"));
    let key = key_file(dir.path());
    let daemon = start_daemon(
        dir.path(),
        "gw",
        None,
        "lo",
        unique_port(),
        &bus.socket,
        &key,
    );
    wait_for_object(&owrt, &bus.socket);
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
    assert_eq!(daemon.get("x"), None);
}

#[test]
fn subscribers_get_change_notifications() {
    let Some(owrt) = Userland::find("subscribers_get_change_notifications") else {
        return;
    };
    let dir = TempDir::new("ubus-subscribe");
    let bus = Ubusd::start(&owrt, &dir.path().join("ubus.sock"));
    let key = key_file(dir.path());
    let daemon = start_daemon(
        dir.path(),
        "gw",
        None,
        "lo",
        unique_port(),
        &bus.socket,
        &key,
    );
    wait_for_object(&owrt, &bus.socket);
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
    let Some(lan) = Lan::new("listen_sees_local_and_remote_changes_in_order", 2) else {
        return;
    };
    lan.connect_all();
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
    let bus = Ubusd::start(&owrt, &dir.path().join("ubus.sock"));
    let key = key_file(dir.path());
    let daemon = start_daemon(
        dir.path(),
        "gw",
        None,
        "lo",
        unique_port(),
        &bus.socket,
        &key,
    );
    wait_for_object(&owrt, &bus.socket);

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
