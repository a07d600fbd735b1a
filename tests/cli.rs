//! The command line as a user meets it: help, exit codes, `--`, global
//! options anywhere, `GWSYNC_SOCKET`, raw and JSON output, `load`,
//! `health`, and keys with control characters, against real daemons
//! started with a key file.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{CliResult, Daemon, TempDir, gwsync, gwsync_command, unique_port, wait_until};

const COMMANDS: &[&str] = &[
    "daemon",
    "get",
    "set",
    "del",
    "list",
    "dump",
    "load",
    "status",
    "health",
    "trigger",
    "watch",
    "reload",
    "genkey",
    #[cfg(feature = "demo")]
    "demo",
    "help",
    "version",
];

/// A key file made by `gwsync genkey`, as a user would make one.
fn key_file(dir: &Path) -> String {
    let path = dir.join("group.key");
    if !path.exists() {
        let key = gwsync(&["genkey"]);
        assert_eq!(key.code, 0, "{key:?}");
        std::fs::write(&path, &key.stdout).unwrap();
    }
    path.to_str().unwrap().to_owned()
}

/// A keyed daemon on the loopback interface; daemons started with the same
/// `port` form one group.
fn daemon(dir: &TempDir, name: &str, port: u16) -> Daemon {
    let key = key_file(dir.path());
    let port = port.to_string();
    Daemon::start(
        dir.path(),
        name,
        None,
        &["--interface", "lo", "--port", &port, "--key-file", &key],
    )
}

fn with_env(args: &[&str], socket: &Path) -> CliResult {
    let output = gwsync_command()
        .args(args)
        .env("GWSYNC_SOCKET", socket)
        .output()
        .unwrap();
    CliResult {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// One raw request on the control socket, as `socat` would send it.
fn control(socket: &Path, request: &str) -> serde_json::Value {
    let stream = UnixStream::connect(socket).unwrap();
    (&stream).write_all(request.as_bytes()).unwrap();
    (&stream).write_all(b"\n").unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

#[test]
fn every_command_has_its_own_help_with_exit_code_0() {
    let overview = gwsync(&["help"]);
    assert_eq!(overview.code, 0, "{overview:?}");
    for command in COMMANDS {
        assert!(
            overview.stdout.contains(&format!("gwsync {command}")),
            "overview lacks {command}: {}",
            overview.stdout
        );
        for args in [
            vec!["help", command],
            vec![command, "--help"],
            vec![command, "-h"],
        ] {
            let result = gwsync(&args);
            assert_eq!(result.code, 0, "{args:?}: {result:?}");
            assert!(
                result
                    .stdout
                    .starts_with(&format!("usage: gwsync {command}")),
                "{args:?}: {}",
                result.stdout
            );
            // The overview lists every command as "  gwsync NAME ...".
            assert!(
                !result
                    .stdout
                    .lines()
                    .any(|line| line.starts_with("  gwsync ")),
                "{args:?} printed the overview, not one command's help"
            );
        }
    }
    assert_eq!(gwsync(&["--help"]).stdout, overview.stdout);
    let unknown = gwsync(&["help", "nosuch"]);
    assert_eq!(unknown.code, 2, "{unknown:?}");
    let version = gwsync(&["--version"]);
    assert_eq!(version.code, 0);
    assert!(version.stdout.starts_with("gwsync "), "{version:?}");
}

#[test]
fn usage_errors_are_one_line_and_a_hint_with_exit_code_2() {
    for (args, says, hint) in [
        (&["set", "k"][..], "missing JSON", "gwsync help set"),
        (&["get"][..], "missing KEY", "gwsync help get"),
        (
            &["get", "a", "b"][..],
            "unexpected argument",
            "gwsync help get",
        ),
        (
            &["get", "--json", "k"][..],
            "unknown option --json",
            "gwsync help get",
        ),
        (&["frobnicate"][..], "unknown command", "gwsync help"),
        (&[][..], "no command given", "gwsync help"),
        (
            &["daemon", "--bogus"][..],
            "unknown option",
            "gwsync help daemon",
        ),
        (
            &["trigger", "sometime"][..],
            "unknown reason",
            "gwsync help trigger",
        ),
        (
            &["set", "k", "not json"][..],
            "not valid JSON",
            "gwsync help set",
        ),
        (
            &["health", "--min-peers", "many"][..],
            "not a number",
            "gwsync help health",
        ),
        (
            &["health", "--min-peers"][..],
            "needs a value",
            "gwsync help health",
        ),
        (
            &["list", "--json=yes"][..],
            "takes no value",
            "gwsync help list",
        ),
    ] {
        let result = gwsync(args);
        assert_eq!(result.code, 2, "{args:?}: {result:?}");
        let lines: Vec<&str> = result.stderr.lines().collect();
        assert_eq!(lines.len(), 2, "{args:?}: {}", result.stderr);
        assert!(lines[0].contains(says), "{args:?}: {}", result.stderr);
        assert!(
            lines[1].contains(hint),
            "{args:?}: no hint: {}",
            result.stderr
        );
        assert!(result.stdout.is_empty(), "{args:?}: {result:?}");
    }
}

#[test]
fn options_never_become_keys_and_double_dash_ends_them() {
    let dir = TempDir::new("cli-dashdash");
    let gw = daemon(&dir, "gw", unique_port());
    // Help wins: nothing is stored under "--help".
    let help = gw.cli(&["set", "--help", "1"]);
    assert_eq!(help.code, 0, "{help:?}");
    assert!(help.stdout.starts_with("usage: gwsync set"));
    let dashed = gw.cli(&["set", "-x", "1"]);
    assert_eq!(dashed.code, 2, "{dashed:?}");
    assert!(dashed.stderr.contains("after `--`"), "{dashed:?}");
    assert_eq!(gw.cli(&["list"]).stdout, "");
    // After `--` a key may start with `-`, and the value may be negative
    // without `--`.
    assert_eq!(gw.cli(&["set", "--", "--help", "1"]).code, 0);
    assert_eq!(gw.cli(&["set", "t", "-5"]).code, 0);
    assert_eq!(gw.cli(&["get", "--", "--help"]).stdout, "1\n");
    assert_eq!(gw.cli(&["get", "t"]).stdout, "-5\n");
    assert_eq!(gw.cli(&["list"]).stdout, "--help\nt\n");
    assert_eq!(gw.cli(&["del", "--", "--help"]).code, 0);
    let gone = gw.cli(&["get", "--", "--help"]);
    assert_eq!(gone.code, 3, "{gone:?}");
    assert!(
        gone.stderr.contains("\"--help\""),
        "names the key: {gone:?}"
    );
}

#[test]
fn the_socket_comes_from_an_option_anywhere_or_the_environment() {
    let dir = TempDir::new("cli-socket");
    let gw = daemon(&dir, "gw", unique_port());
    let socket = gw.socket.to_str().unwrap();
    assert_eq!(gwsync(&["set", "a", "1", "--socket", socket]).code, 0);
    let eq = format!("--socket={socket}");
    assert_eq!(gwsync(&["get", &eq, "a"]).stdout, "1\n");
    assert_eq!(with_env(&["get", "a"], &gw.socket).stdout, "1\n");
    // The option beats the environment.
    let missing = dir.path().join("nobody.sock");
    let beaten = with_env(&["get", "a", "--socket", socket], &missing);
    assert_eq!(beaten.stdout, "1\n", "{beaten:?}");
    let unreachable = with_env(&["get", "a"], &missing);
    assert_eq!(unreachable.code, 1, "{unreachable:?}");
    assert!(
        unreachable.stderr.contains("nobody.sock"),
        "{unreachable:?}"
    );
}

#[test]
fn raw_and_json_output_for_scripts() {
    let dir = TempDir::new("cli-raw");
    let gw = daemon(&dir, "gw", unique_port());
    gw.set("wifi/ssid", r#""home \"net\"""#);
    gw.set("wifi/cfg", r#"{"band": 5}"#);
    assert_eq!(
        gw.cli(&["get", "--raw", "wifi/ssid"]).stdout,
        "home \"net\"\n"
    );
    assert_eq!(
        gw.cli(&["get", "wifi/ssid"]).stdout,
        "\"home \\\"net\\\"\"\n"
    );
    assert_eq!(
        gw.cli(&["get", "wifi/cfg", "--raw"]).stdout,
        "{\"band\":5}\n"
    );
    let listed = gw.cli(&["list", "--json", "wifi/"]);
    assert_eq!(listed.code, 0, "{listed:?}");
    let keys: Vec<String> = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(keys, ["wifi/cfg", "wifi/ssid"]);
    assert_eq!(
        serde_json::from_str::<Vec<String>>(&gw.cli(&["list", "--json", "none/"]).stdout).unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn keys_with_control_characters_are_refused_with_the_key_named() {
    let dir = TempDir::new("cli-ctl");
    let gw = daemon(&dir, "gw", unique_port());
    for key in ["two\nlines", "tab\there", "esc\u{1b}[31m", "del\u{7f}"] {
        let refused = gw.cli(&["set", key, "1"]);
        assert_eq!(refused.code, 1, "{key:?}: {refused:?}");
        assert!(
            refused.stderr.contains("control character")
                && refused.stderr.contains(&format!("{key:?}")),
            "{key:?}: {}",
            refused.stderr
        );
        let answer = control(
            &gw.socket,
            &serde_json::json!({"op": "set", "key": key, "value": 1}).to_string(),
        );
        assert_eq!(answer["error"], "invalid_key", "{answer}");
    }
    assert_eq!(gw.cli(&["list"]).stdout, "", "nothing was stored");
    let long = "k".repeat(300);
    let too_long = gw.cli(&["set", &long, "1"]);
    assert_eq!(too_long.code, 1);
    assert!(
        too_long.stderr.contains("300 bytes") && too_long.stderr.contains("limit is 256 bytes"),
        "{}",
        too_long.stderr
    );
    let big = format!("\"{}\"", "v".repeat(70_000));
    let too_large = gw.cli(&["set", "big", &big]);
    assert_eq!(too_large.code, 1);
    assert!(
        too_large.stderr.contains("\"big\"") && too_large.stderr.contains("limit is 65536 bytes"),
        "{}",
        too_large.stderr
    );
    let missing = gw.cli(&["del", "not/here"]);
    assert_eq!(missing.code, 3);
    assert!(missing.stderr.contains("\"not/here\""), "{missing:?}");
}

#[test]
fn load_restores_a_dump_without_overwriting_newer_data() {
    let dir = TempDir::new("cli-load-dump");
    let gw = daemon(&dir, "gw", unique_port());
    gw.set("a", "1");
    gw.set("b", r#""two""#);
    gw.set("c", "[3]");
    let dump = gw.cli(&["dump"]);
    let file = dir.path().join("dump.json");
    std::fs::write(&file, &dump.stdout).unwrap();
    gw.set("b", r#""newer""#);
    assert_eq!(gw.cli(&["del", "c"]).code, 0);
    let fresh = daemon(&dir, "fresh", unique_port());
    let loaded = fresh.cli(&["load", file.to_str().unwrap()]);
    assert_eq!(loaded.code, 0, "{loaded:?}");
    assert!(loaded.stdout.contains("3 applied"), "{loaded:?}");
    assert_eq!(fresh.cli(&["dump"]).stdout, dump.stdout);
    // A dump has no versions: on the gateway that changed since, it fills
    // in nothing and overwrites nothing.
    let again = gw.cli(&["load", file.to_str().unwrap()]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again
            .stdout
            .contains("0 applied, 1 unchanged, 2 kept (newer here), 0 rejected"),
        "{again:?}"
    );
    assert_eq!(gw.get("b").as_deref(), Some("\"newer\""));
    assert_eq!(gw.cli(&["get", "c"]).code, 3);
    // From standard input, with a bad entry: counted, named, exit 1.
    let mut child = fresh
        .cli_command(&["load", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"ok\\nkey\": 1, \"d\": 4}")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout} {stderr}");
    assert!(
        stdout.contains("1 applied") && stdout.contains("1 rejected"),
        "{stdout}"
    );
    assert!(stderr.contains("\"ok\\nkey\""), "{stderr}");
    assert_eq!(fresh.get("d").as_deref(), Some("4"));
}

#[test]
fn load_of_a_state_file_merges_by_version() {
    let dir = TempDir::new("cli-load-state");
    let mut old = daemon(&dir, "old", unique_port());
    old.set("x", r#""old""#);
    old.set("y", r#""old""#);
    assert_eq!(old.cli(&["del", "y"]).code, 0);
    old.terminate();
    let state = old.state_dir.join("state.json");
    let gw = daemon(&dir, "gw", unique_port());
    gw.set("y", r#""revived""#);
    // Written after the backup: newer than its "x".
    gw.set("x", r#""new""#);
    let loaded = gw.cli(&["load", state.to_str().unwrap()]);
    assert_eq!(loaded.code, 0, "{loaded:?}");
    // "y" was deleted in the backup before it was set here: the tombstone is
    // older and stays out; "x" here is newer.
    assert!(
        loaded
            .stdout
            .contains("0 applied, 0 unchanged, 2 kept (newer here)"),
        "{loaded:?}"
    );
    assert_eq!(gw.get("x").as_deref(), Some("\"new\""));
    assert_eq!(gw.get("y").as_deref(), Some("\"revived\""));
    // On an empty gateway the backup applies whole, tombstone included,
    // and the group hears it.
    let port = unique_port();
    let empty = daemon(&dir, "empty", port);
    let peer = daemon(&dir, "peer", port);
    let restored = empty.cli(&["load", state.to_str().unwrap()]);
    assert!(restored.stdout.contains("2 applied"), "{restored:?}");
    assert_eq!(empty.get("x").as_deref(), Some("\"old\""));
    assert_eq!(empty.cli(&["get", "y"]).code, 3);
    wait_until(
        "the peer holds the loaded entry",
        Duration::from_secs(20),
        || peer.get("x").as_deref() == Some("\"old\""),
    );
}

#[test]
fn health_exits_0_only_when_the_daemon_is_serving_and_peers_are_heard() {
    let dir = TempDir::new("cli-health");
    let nobody = with_env(&["health"], &dir.path().join("none.sock"));
    assert_eq!(nobody.code, 1, "{nobody:?}");
    assert!(nobody.stderr.contains("unhealthy"), "{nobody:?}");
    let port = unique_port();
    let gw = daemon(&dir, "gw", port);
    let alone = gw.cli(&["health"]);
    assert_eq!(alone.code, 0, "{alone:?}");
    assert!(alone.stdout.starts_with("ok: 0 gateway"), "{alone:?}");
    let lonely = gw.cli(&["health", "--min-peers", "1"]);
    assert_eq!(lonely.code, 1, "{lonely:?}");
    assert!(lonely.stderr.contains("at least 1"), "{lonely:?}");
    let other = daemon(&dir, "other", port);
    other.set("hello", "1");
    wait_until(
        "gw hears the other gateway",
        Duration::from_secs(20),
        || gw.cli(&["health", "--min-peers=1"]).code == 0,
    );
    let healthy = gw.cli(&["health", "--min-peers", "1"]);
    assert!(
        healthy.stdout.starts_with("ok: 1 gateway(s) heard, ")
            && healthy.stdout.contains(" with the same data, last heard "),
        "{healthy:?}"
    );
    let summary = gw.cli(&["status"]);
    assert_eq!(summary.code, 0, "{summary:?}");
    let other_id = other.status()["node_id"].as_str().unwrap().to_owned();
    assert!(summary.stdout.contains("key: keyed"), "{}", summary.stdout);
    assert!(summary.stdout.contains(&other_id), "{}", summary.stdout);
    assert!(
        summary.stdout.contains("gateways heard: 1"),
        "{}",
        summary.stdout
    );
    assert!(
        serde_json::from_str::<serde_json::Value>(&summary.stdout).is_err(),
        "status without --json is for people"
    );
}

#[test]
fn the_socket_directory_is_never_created() {
    let dir = TempDir::new("cli-sockdir");
    let missing = dir.path().join("no/such/dir");
    let key = key_file(dir.path());
    let out = gwsync_command()
        .args([
            "daemon",
            "--foreground",
            "--interface",
            "lo",
            "--key-file",
            &key,
        ])
        .arg("--port")
        .arg(unique_port().to_string())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(missing.join("gwsync.sock"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(
        !dir.path().join("no").exists(),
        "the daemon created the directory"
    );
}

#[test]
fn reload_sends_the_reload_op_and_reports_the_answer() {
    let dir = TempDir::new("cli-reload");
    let path = dir.path().join("listener.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let mut requests = Vec::new();
        for answer in [
            r#"{"ok":true}"#,
            r#"{"ok":false,"error":"bad_request","message":"key file unreadable"}"#,
        ] {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            requests.push(line);
            (&stream)
                .write_all(format!("{answer}\n").as_bytes())
                .unwrap();
        }
        requests
    });
    let ok = with_env(&["reload"], &path);
    assert_eq!(ok.code, 0, "{ok:?}");
    let failed = with_env(&["reload"], &path);
    assert_eq!(failed.code, 1, "{failed:?}");
    assert!(failed.stderr.contains("key file unreadable"), "{failed:?}");
    let requests = server.join().unwrap();
    for request in requests {
        let parsed: serde_json::Value = serde_json::from_str(&request).unwrap();
        assert_eq!(parsed, serde_json::json!({"op": "reload"}));
    }
}

#[test]
#[ignore = "run by skips_fail_under_ci_and_are_counted_outside_it"]
fn skip_probe() {
    common::skip("probe: a missing precondition");
}

#[test]
fn skips_fail_under_ci_and_are_counted_outside_it() {
    let exe = std::env::current_exe().unwrap();
    let probe = |ci: Option<&str>| {
        let mut command = common::target_command(&exe);
        command.args(["--ignored", "--exact", "skip_probe", "--test-threads=1"]);
        command.env_remove("CI");
        if let Some(value) = ci {
            command.env("CI", value);
        }
        let out = command.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    for ci in ["1", "true"] {
        let (passed, text) = probe(Some(ci));
        assert!(!passed, "CI={ci}: a skip passed: {text}");
        assert!(text.contains("cannot run under CI: probe"), "{text}");
    }
    for ci in [None, Some("0"), Some("false")] {
        let (passed, text) = probe(ci);
        assert!(passed, "CI={ci:?}: {text}");
        assert!(
            text.contains("SKIPPED: probe: a missing precondition"),
            "{text}"
        );
        assert!(
            text.contains("SKIPPED: 1 test(s)"),
            "no summary line: {text}"
        );
    }
}

#[test]
fn the_systemd_unit_verifies_and_its_command_line_starts_a_daemon() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/gwsync.service"),
    )
    .unwrap();
    let exec: String = unit
        .split("ExecStart=")
        .nth(1)
        .expect("an ExecStart line")
        .lines()
        .map(|line| line.trim().trim_end_matches('\\').to_owned())
        .take_while(|line| !line.contains('='))
        .collect::<Vec<_>>()
        .join(" ");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(words[0], "/usr/local/sbin/gwsync", "{exec}");
    let dir = TempDir::new("cli-systemd");
    // Its flags, with the paths moved into the test's directory.
    let key = key_file(dir.path());
    let state = dir.path().join("state");
    let socket = dir.path().join("gwsync.sock");
    let args: Vec<String> = words[1..]
        .iter()
        .map(|word| match *word {
            "/var/lib/gwsync" => state.to_str().unwrap().to_owned(),
            "/etc/gwsync.key" => key.clone(),
            other => other.to_owned(),
        })
        .collect();
    let mut child = gwsync_command()
        .args(&args)
        .args(["--interface", "lo", "--port", &unique_port().to_string()])
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the unit's daemon answers", Duration::from_secs(10), || {
        with_env(&["health"], &socket).code == 0
    });
    let _ = child.kill();
    let _ = child.wait();
    let Ok(analyze) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        common::skip("systemd-analyze is not installed (apt-get install systemd)");
        return;
    };
    assert!(analyze.status.success());
    let copy = dir.path().join("gwsync.service");
    std::fs::write(&copy, unit.replace("/usr/local/sbin/gwsync", common::BIN)).unwrap();
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "{stderr}"
    );
}

#[test]
fn the_readme_starts_with_the_two_commands_and_lists_real_commands() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let first: Vec<&str> = readme
        .lines()
        .filter(|line| !line.trim().is_empty())
        .take(3)
        .collect();
    assert!(
        first[1]
            .trim_start()
            .starts_with("cargo run --release -- demo"),
        "{first:?}"
    );
    assert!(first[2].trim_start().starts_with("cargo test"), "{first:?}");
    let section = readme
        .split("## The command line")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a command line section");
    let mut seen = 0;
    for line in section.lines() {
        let Some(rest) = line.trim_start().strip_prefix("gwsync ") else {
            continue;
        };
        let command = rest.split([' ', '|']).next().unwrap();
        if command.starts_with('-') || !command.chars().all(|c| c.is_ascii_lowercase()) {
            continue;
        }
        let help = gwsync(&["help", command]);
        assert_eq!(help.code, 0, "README mentions `gwsync {command}`: {help:?}");
        seen += 1;
    }
    assert!(
        seen >= COMMANDS.len() - 3,
        "only {seen} commands found in the README"
    );
}
