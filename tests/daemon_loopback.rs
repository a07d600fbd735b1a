//! Several daemons as separate processes on the loopback interface, each
//! test on its own port, driven through the real CLI.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::{Daemon, TempDir, gwsync, unique_port, wait_until};

const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

fn group_on_lo(dir: &TempDir, count: usize) -> Vec<Daemon> {
    let port = unique_port().to_string();
    (0..count)
        .map(|index| {
            Daemon::start(
                dir.path(),
                &format!("gw{index}"),
                None,
                &["--interface", "lo", "--port", &port],
            )
        })
        .collect()
}

#[test]
fn a_value_set_on_one_daemon_is_readable_on_the_others() {
    let dir = TempDir::new("set-get");
    let daemons = group_on_lo(&dir, 3);
    daemons[0].set("home/1/scene", r#"{ "on": true, "level": 40 }"#);
    assert_eq!(
        daemons[0].get("home/1/scene").as_deref(),
        Some(r#"{"on":true,"level":40}"#)
    );
    for daemon in &daemons[1..] {
        wait_until(
            &format!("{} has home/1/scene", daemon.name),
            SYNC_TIMEOUT,
            || daemon.get("home/1/scene").as_deref() == Some(r#"{"on":true,"level":40}"#),
        );
    }
    let listed = daemons[2].cli(&["list", "home/"]);
    assert_eq!(listed.stdout, "home/1/scene\n");
    let dumped = daemons[1].cli(&["dump"]);
    assert_eq!(
        dumped.stdout.trim_end(),
        r#"{"home/1/scene":{"on":true,"level":40}}"#
    );
    assert_eq!(daemons[1].status()["live_entries"], 1);
    // Trickle keeps consistent gateways quiet (k = 1), so gw1 need not
    // have heard gw2 yet; it has heard gw0, whose write it holds.
    let gw0_id = daemons[0].status()["node_id"].clone();
    let peers = daemons[1].status()["peers"].clone();
    assert!(
        peers
            .as_array()
            .unwrap()
            .iter()
            .any(|peer| peer["node_id"] == gw0_id),
        "{peers}"
    );
}

#[test]
fn a_delete_propagates() {
    let dir = TempDir::new("del");
    let daemons = group_on_lo(&dir, 3);
    daemons[1].set("gone", "1");
    for daemon in &daemons {
        wait_until(&format!("{} has gone", daemon.name), SYNC_TIMEOUT, || {
            daemon.get("gone").is_some()
        });
    }
    assert_eq!(daemons[2].cli(&["del", "gone"]).code, 0);
    for daemon in &daemons {
        wait_until(&format!("{} lost gone", daemon.name), SYNC_TIMEOUT, || {
            daemon.cli(&["get", "gone"]).code == 3
        });
    }
}

#[test]
fn watch_sees_changes_from_other_gateways() {
    let dir = TempDir::new("watch");
    let daemons = group_on_lo(&dir, 2);
    let mut watcher = common::gwsync_command()
        .args(["--socket", daemons[1].socket.to_str().unwrap(), "watch"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watcher.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The watch is registered once the daemon has answered it; a set made
    // before that would be missed, so repeat until a line arrives.
    let mut seen = Vec::new();
    wait_until("watch prints the change", SYNC_TIMEOUT, || {
        if seen.is_empty() {
            daemons[0].set("w", r#"{"n":1}"#);
        }
        while let Ok(line) = lines.try_recv() {
            seen.push(line);
        }
        !seen.is_empty()
    });
    let first: serde_json::Value = serde_json::from_str(&seen[0]).unwrap();
    assert_eq!(first["key"], "w");
    assert_eq!(first["value"]["n"], 1);
    assert_eq!(first["origin"], daemons[0].status()["node_id"]);
    daemons[0].cli(&["del", "w"]);
    wait_until("watch prints the delete", SYNC_TIMEOUT, || {
        while let Ok(line) = lines.try_recv() {
            seen.push(line);
        }
        seen.iter().any(|line| line.contains("\"deleted\":true"))
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
}

#[test]
fn cli_errors_have_clear_messages_and_documented_exit_codes() {
    let dir = TempDir::new("cli-errors");
    let daemons = group_on_lo(&dir, 1);
    let daemon = &daemons[0];

    let missing = daemon.cli(&["get", "no/such/key"]);
    assert_eq!(missing.code, 3, "{missing:?}");
    assert!(missing.stderr.contains("not found"), "{missing:?}");
    assert_eq!(daemon.cli(&["del", "no/such/key"]).code, 3);

    let invalid = daemon.cli(&["set", "k", "{not json"]);
    assert_eq!(invalid.code, 2, "{invalid:?}");
    assert!(invalid.stderr.contains("not valid JSON"), "{invalid:?}");
    let bare_word = daemon.cli(&["set", "k", "on"]);
    assert_eq!(bare_word.code, 2, "{bare_word:?}");

    let big = format!("\"{}\"", "x".repeat(70_000));
    let oversized = daemon.cli(&["set", "k", &big]);
    assert_eq!(oversized.code, 1, "{oversized:?}");
    assert!(oversized.stderr.contains("too large"), "{oversized:?}");
    assert!(oversized.stderr.contains("65536"), "{oversized:?}");

    let no_daemon = gwsync(&[
        "--socket",
        dir.path().join("nobody.sock").to_str().unwrap(),
        "get",
        "k",
    ]);
    assert_eq!(no_daemon.code, 1, "{no_daemon:?}");
    assert!(
        no_daemon.stderr.contains("cannot reach the daemon"),
        "{no_daemon:?}"
    );

    assert_eq!(gwsync(&["frobnicate"]).code, 2);
    assert_eq!(gwsync(&[]).code, 2);
    assert_eq!(daemon.cli(&["get"]).code, 2);
    assert_eq!(daemon.cli(&["trigger", "sometimes"]).code, 2);
    assert_eq!(daemon.cli(&["trigger", "network-up"]).code, 0);
    assert_eq!(gwsync(&["daemon", "--group", "10.0.0.1"]).code, 2);
}

#[test]
fn version_help_and_genkey() {
    for flag in ["--version", "-V", "version"] {
        let result = gwsync(&[flag]);
        assert_eq!(result.code, 0);
        assert_eq!(result.stdout, "gwsync 0.1.0\n");
    }
    let help = gwsync(&["--help"]);
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("gwsync daemon"));
    let key = gwsync(&["genkey"]);
    assert_eq!(key.code, 0);
    let hex = key.stdout.trim();
    assert_eq!(hex.len(), 64);
    assert!(hex.chars().all(|ch| ch.is_ascii_hexdigit()));
    assert_ne!(gwsync(&["genkey"]).stdout, key.stdout);
}

#[test]
fn control_socket_is_private_and_a_second_daemon_on_it_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("socket-mode");
    let daemons = group_on_lo(&dir, 1);
    let mode = std::fs::metadata(&daemons[0].socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = common::gwsync_command()
        .args([
            "daemon",
            "--foreground",
            "--open",
            "--interface",
            "lo",
            "--socket",
        ])
        .arg(&daemons[0].socket)
        .arg("--state-dir")
        .arg(dir.path().join("second"))
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("already serving"));
}

#[test]
fn sigterm_saves_the_state_and_a_restart_restores_it() {
    let dir = TempDir::new("restart");
    let mut daemons = group_on_lo(&dir, 1);
    daemons[0].set("kept", r#"[1,2,3]"#);
    daemons[0].terminate();
    let state = std::fs::read_to_string(daemons[0].state_dir.join("state.json")).unwrap();
    assert!(state.contains("\"kept\""), "{state}");
    daemons[0].restart();
    assert_eq!(daemons[0].get("kept").as_deref(), Some("[1,2,3]"));
    assert!(daemons[0].log_text().contains("restored 1 entries"));
}

#[test]
fn demo_converges_to_version_3() {
    let demo = gwsync(&["demo"]);
    assert_eq!(demo.code, 0, "{demo:?}");
    assert!(
        demo.stdout.contains("All three gateways hold version 3"),
        "{}",
        demo.stdout
    );
    assert!(
        demo.stdout.contains("gw2  -> group: sync request"),
        "{}",
        demo.stdout
    );
}

#[test]
fn only_daemons_with_the_group_key_share_data_and_the_others_are_named_loudly() {
    let dir = TempDir::new("keyed");
    let key_file = dir.path().join("group.key");
    std::fs::write(&key_file, gwsync(&["genkey"]).stdout).unwrap();
    let other_key_file = dir.path().join("other.key");
    std::fs::write(&other_key_file, gwsync(&["genkey"]).stdout).unwrap();
    let port = unique_port().to_string();
    let keyed_args = [
        "--interface",
        "lo",
        "--port",
        &port,
        "--key-file",
        key_file.to_str().unwrap(),
    ];
    let a = Daemon::start(dir.path(), "keyed-a", None, &keyed_args);
    let b = Daemon::start(dir.path(), "keyed-b", None, &keyed_args);
    let open = Daemon::start(
        dir.path(),
        "open",
        None,
        &["--interface", "lo", "--port", &port, "--open"],
    );
    let stranger = Daemon::start(
        dir.path(),
        "stranger",
        None,
        &[
            "--interface",
            "lo",
            "--port",
            &port,
            "--key-file",
            other_key_file.to_str().unwrap(),
        ],
    );
    assert_eq!(a.status()["keyed"], true);
    assert_eq!(a.status()["key_state"], "keyed");
    assert_eq!(open.status()["key_state"], "open");
    a.set("secret", r#""s3""#);
    wait_until("b has the keyed write", SYNC_TIMEOUT, || {
        b.get("secret").as_deref() == Some(r#""s3""#)
    });
    open.set("open", "1");
    stranger.set("strange", "2");
    wait_until(
        "a names the open and the wrongly keyed gateway in status",
        SYNC_TIMEOUT,
        || {
            let other = a.status()["other_key"].clone();
            other["datagrams"].as_u64().unwrap_or(0) >= 2
                && other["addresses"].as_array().is_some_and(|a| a.len() == 1)
        },
    );
    // Every daemon here sends from this host's address on lo.
    let address = a.status()["other_key"]["addresses"][0]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until("a warns about another key in its log", SYNC_TIMEOUT, || {
        a.log_text().contains("with another key: ")
    });
    let log = a.log_text();
    let warning = log
        .lines()
        .find(|line| line.contains("with another key"))
        .unwrap();
    assert!(warning.contains(&address), "{warning}");
    assert!(warning.contains("datagram"), "{warning}");
    // Rate-limited: one warning for the whole burst, not one per datagram.
    assert_eq!(log.matches("with another key").count(), 1, "{log}");
    assert_eq!(open.get("secret"), None);
    assert_eq!(stranger.get("secret"), None);
    assert_eq!(a.get("open"), None);
    assert_eq!(a.get("strange"), None);
    // The key-less gateway hears the keyed ones as "another key" too.
    wait_until(
        "the open gateway names the keyed ones",
        SYNC_TIMEOUT,
        || open.status()["other_key"]["senders"].as_u64() == Some(1),
    );
}
