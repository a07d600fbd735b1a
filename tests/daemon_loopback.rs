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

#[cfg(feature = "demo")]
#[test]
fn demo_converges_to_the_newest_write() {
    let demo = gwsync(&["demo"]);
    assert_eq!(demo.code, 0, "{demo:?}");
    assert!(
        demo.stdout.contains("all three gateways hold gw3's write"),
        "{}",
        demo.stdout
    );
    assert!(!demo.stdout.contains("version"), "{}", demo.stdout);
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

fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A tmpfs mounted for one test, unmounted on drop even when it fails.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: std::path::PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).unwrap();
        common::run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "gwsync-test",
                path.to_str().unwrap(),
            ],
        );
        Tmpfs(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `dir` up to the last byte.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    // The last partial chunk, byte by byte.
    while file.write_all(&chunk[..1]).is_ok() {}
    let _ = file.sync_all();
    path
}

#[test]
fn a_full_state_disk_is_loud_and_nothing_acknowledged_is_lost() {
    if !common::is_root() {
        common::skip("a_full_state_disk_is_loud: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let dir = TempDir::new("full-disk");
    let fs = Tmpfs::mount(dir.path().join("flash"), "256k");
    let state_dir = fs.0.join("gwsync");
    let port = unique_port().to_string();
    let mut daemon = Daemon::start(
        dir.path(),
        "gw",
        None,
        &[
            "--interface",
            "lo",
            "--port",
            &port,
            "--state-dir",
            state_dir.to_str().unwrap(),
        ],
    );
    let mut acknowledged = Vec::new();
    for index in 0..5 {
        daemon.set(&format!("before/{index}"), &index.to_string());
        acknowledged.push(format!("before/{index}"));
    }
    wait_until("the first writes are saved", SYNC_TIMEOUT, || {
        daemon.status()["persist"]["unsaved_changes"] == 0
    });
    assert_eq!(mode_of(&state_dir.join("state.json")), 0o600);
    assert_eq!(mode_of(&state_dir.join("node_id")), 0o600);

    let filler = fill(&fs.0);
    // The first write after the disk filled is acknowledged before any
    // save could fail (the debounce window, as documented); the save that
    // follows fails and from then on writes say they are not saved.
    daemon.set("during/0", r#""x""#);
    acknowledged.push("during/0".to_owned());
    wait_until("status says saving fails", SYNC_TIMEOUT, || {
        daemon.status()["persist"]["ok"] == false
    });
    let refused = daemon.cli(&["set", "during/1", r#""y""#]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("NOT saved"), "{refused:?}");
    let status = daemon.status();
    let persist = &status["persist"];
    assert!(
        persist["error"].as_str().unwrap().contains("No space left"),
        "{persist}"
    );
    assert!(
        persist["unsaved_changes"].as_u64().unwrap() >= 2,
        "{persist}"
    );
    // Failures repeat every debounce interval; the log says so once.
    wait_until("a second save failed", SYNC_TIMEOUT, || {
        daemon.status()["counters"]["state_write_errors"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    });
    assert_eq!(
        daemon.log_text().matches("could not save state").count(),
        1,
        "{}",
        daemon.log_text()
    );
    // The write was applied all the same: readable, and synced.
    assert_eq!(daemon.get("during/1").as_deref(), Some(r#""y""#));

    std::fs::remove_file(&filler).unwrap();
    wait_until("saving recovers once space is free", SYNC_TIMEOUT, || {
        let status = daemon.status();
        status["persist"]["ok"] == true && status["persist"]["unsaved_changes"] == 0
    });
    assert!(daemon.log_text().contains("state saved again"));
    assert_eq!(daemon.cli(&["set", "after/0", "1"]).code, 0);
    acknowledged.push("after/0".to_owned());
    wait_until("the last write is saved", SYNC_TIMEOUT, || {
        daemon.status()["persist"]["unsaved_changes"] == 0
    });
    // Not even a chance to flush: all that was acknowledged is on disk.
    daemon.kill9();
    daemon.restart();
    for key in &acknowledged {
        assert!(daemon.get(key).is_some(), "{key} lost");
    }
    assert_eq!(daemon.get("during/1").as_deref(), Some(r#""y""#));

    // A stop while saving fails says what is lost instead of "saved".
    let filler = fill(&fs.0);
    daemon.set("doomed", "1");
    wait_until("saving fails again", SYNC_TIMEOUT, || {
        daemon.status()["persist"]["ok"] == false
    });
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("the shutdown log tells the truth", SYNC_TIMEOUT, || {
        daemon.log_text().contains("stopping: could not save state")
    });
    assert!(!daemon.log_text().contains("stopping: state saved"));
    std::fs::remove_file(&filler).unwrap();
}

#[test]
fn state_files_are_private_and_unsafe_directories_and_foreign_sockets_are_refused() {
    if !common::is_root() {
        common::skip(
            "state_files_are_private: needs root to act as a second user (CI runs as root)",
        );
        return;
    }
    if !common::runner_argv().is_empty() {
        // File modes and users are the kernel's, the same on every CPU;
        // running the target binary as another user through the emulator
        // adds nothing but the emulator's own permission needs.
        common::skip_on_emulator("state_files_are_private: host only");
        return;
    }
    let dir = TempDir::new("private");
    chmod(dir.path(), 0o755);
    let port = unique_port().to_string();
    let key_file = common::group_key_file(dir.path());

    // Whatever the umask, and in a directory others may read.
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o755);
    let socket = dir.path().join("gw.sock");
    let log = std::fs::File::create(dir.path().join("gw.log")).unwrap();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(common::BIN)
        .args([
            "daemon",
            "--foreground",
            "--interface",
            "lo",
            "--port",
            &port,
        ])
        .arg("--key-file")
        .arg(&key_file)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .stderr(log)
        .spawn()
        .unwrap();
    let cli = |args: &[&str]| {
        let mut full = vec!["--socket", socket.to_str().unwrap()];
        full.extend_from_slice(args);
        gwsync(&full)
    };
    wait_until("the daemon answers", SYNC_TIMEOUT, || {
        cli(&["status"]).code == 0
    });
    assert_eq!(cli(&["set", "wifi/psk", r#""hunter2""#]).code, 0);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(mode_of(&state.join("state.json")), 0o600);
    assert_eq!(mode_of(&state.join("node_id")), 0o600);
    assert_eq!(mode_of(&state), 0o700);
    let log = std::fs::read_to_string(dir.path().join("gw.log")).unwrap();
    assert!(log.contains("made it 0700"), "{log}");
    let as_nobody = |args: &[&str]| {
        std::process::Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .args(args)
            .output()
            .unwrap()
    };
    let peek = as_nobody(&["cat", state.join("state.json").to_str().unwrap()]);
    assert!(!peek.status.success());
    assert!(!String::from_utf8_lossy(&peek.stdout).contains("hunter2"));

    // A state or socket directory others may write to is refused.
    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    chmod(&open_dir, 0o777);
    let daemon_with = |socket: &std::path::Path, state: &std::path::Path| {
        common::gwsync_command()
            .args(["daemon", "--foreground", "--open", "--interface", "lo"])
            .args(["--port", &port, "--socket"])
            .arg(socket)
            .arg("--state-dir")
            .arg(state)
            .output()
            .unwrap()
    };
    let refused = daemon_with(&dir.path().join("x.sock"), &open_dir);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("writable by other users"), "{stderr}");
    let refused = daemon_with(&open_dir.join("x.sock"), &dir.path().join("state2"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("writable by other users"), "{stderr}");
    let missing = daemon_with(
        &dir.path().join("no/such/dir/x.sock"),
        &dir.path().join("state3"),
    );
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(!dir.path().join("no").exists());

    // Another user's socket in a shared sticky directory: the CLI will not
    // hand it our request.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o1777);
    let squat = shared.join("gwsync.sock");
    // setpriv execs in place (runuser would fork), so kill() reaches gwsync.
    let as_nobody_in_place = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    let mut impostor = std::process::Command::new("setpriv")
        .args(as_nobody_in_place)
        .args([common::BIN, "daemon", "--foreground", "--open"])
        .args(["--interface", "lo", "--port", &port, "--socket"])
        .arg(&squat)
        .arg("--state-dir")
        .arg(shared.join("nobody-state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the impostor listens", SYNC_TIMEOUT, || {
        std::os::unix::net::UnixStream::connect(&squat).is_ok()
    });
    let refused = gwsync(&["--socket", squat.to_str().unwrap(), "set", "wifi/psk", "1"]);
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("belongs to uid 65534"),
        "{refused:?}"
    );

    // A non-root user's default paths: a private directory it creates and
    // checks, never one another user made first.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    chmod(&tmp, 0o1777);
    let private = tmp.join("gwsync-65534");
    std::fs::create_dir(&private).unwrap();
    chmod(&private, 0o777);
    let nobody_daemon = |args: &[&str]| {
        let mut command = std::process::Command::new("setpriv");
        command
            .args(as_nobody_in_place)
            .args(["env", "-u", "XDG_RUNTIME_DIR"])
            .args(["-u", "XDG_STATE_HOME", "HOME="])
            .arg(format!("TMPDIR={}", tmp.display()))
            .arg(common::BIN)
            .args(args);
        command
    };
    let squatted = nobody_daemon(&[])
        .args(["daemon", "--open"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&squatted.stderr);
    assert_eq!(squatted.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a private directory"), "{stderr}");
    std::fs::remove_dir(&private).unwrap();
    let mut own = nobody_daemon(&[])
        .args([
            "daemon",
            "--foreground",
            "--open",
            "--interface",
            "lo",
            "--port",
            &port,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "nobody's daemon answers on its default socket",
        SYNC_TIMEOUT,
        || {
            nobody_daemon(&[])
                .arg("status")
                .output()
                .unwrap()
                .status
                .success()
        },
    );
    let _ = own.kill();
    let _ = own.wait();
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&private).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (65534, 0o700));
}

/// A raw control connection, for clients that misbehave.
fn raw_client(socket: &std::path::Path) -> std::os::unix::net::UnixStream {
    std::os::unix::net::UnixStream::connect(socket).unwrap()
}

#[test]
fn control_socket_clients_are_bounded_and_cannot_lock_out_the_others() {
    use std::io::{Read, Write};
    let dir = TempDir::new("control-limits");
    let daemons = group_on_lo(&dir, 1);
    let daemon = &daemons[0];
    daemon.set("big", &format!("\"{}\"", "x".repeat(60_000)));
    let rss_kib = || {
        std::fs::read_to_string(format!("/proc/{}/status", daemon.pid()))
            .unwrap()
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|text| text.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap()
    };

    // A request naming a field twice is refused, not half-obeyed.
    let mut twice = raw_client(&daemon.socket);
    twice
        .write_all(b"{\"op\":\"get\",\"key\":\"big\",\"op\":\"del\"}\n")
        .unwrap();
    let mut reply = String::new();
    BufReader::new(&twice).read_line(&mut reply).unwrap();
    assert!(reply.contains("\"error\":\"bad_request\""), "{reply}");
    assert!(reply.contains("given twice"), "{reply}");
    assert!(daemon.get("big").is_some());

    // Thousands of pipelined dumps that are never read: the daemon keeps
    // one reply for that client, not thousands, and serves the others.
    let mut flood = raw_client(&daemon.socket);
    flood.set_nonblocking(true).unwrap();
    let request = b"{\"op\":\"dump\"}\n".repeat(2_000);
    let mut sent = 0;
    while sent < request.len() {
        match flood.write(&request[sent..]) {
            Ok(len) => sent += len,
            Err(_) => break,
        }
    }
    assert!(sent > 0);
    assert_eq!(daemon.cli(&["get", "big"]).code, 0);
    // Under the cross emulator the process is qemu, whose own memory
    // dwarfs the daemon's: the bound is checked on the host.
    if common::runner_argv().is_empty() {
        assert!(rss_kib() < 32 * 1024, "peak RSS {} KiB", rss_kib());
    }

    // 40 connections that never say a word: each new client evicts the
    // longest idle one, so the CLI still gets in.
    let idle: Vec<_> = (0..40).map(|_| raw_client(&daemon.socket)).collect();
    assert_eq!(daemon.cli(&["get", "big"]).code, 0);
    let control = daemon.status()["control"].clone();
    assert!(
        control["clients_evicted"].as_u64().unwrap() >= 8,
        "{control}"
    );
    drop(idle);

    // Clients stuck half-way through a request count as busy while fresh:
    // past the limit new ones are refused, and the log says so once, with
    // a count. Once they have stalled for a while they are evicted.
    let mut stuck: Vec<_> = (0..60)
        .map(|_| {
            let mut client = raw_client(&daemon.socket);
            // A client past the limit is accepted and closed at once, so
            // its write may meet a broken pipe: that refusal is counted
            // below, not an error here.
            let _ = client.write_all(b"{\"op\":");
            client
        })
        .collect();
    let evicted_before = control["clients_evicted"].as_u64().unwrap();
    wait_until(
        "stalled clients are evicted and the CLI gets in",
        SYNC_TIMEOUT,
        || daemon.cli(&["get", "big"]).code == 0,
    );
    let control = daemon.status()["control"].clone();
    assert!(
        control["clients_evicted"].as_u64().unwrap() > evicted_before,
        "{control}"
    );
    // Whether any connect had to be refused depends on how fast the 60
    // came (a client fresh in mid-request is busy for 50 ms, then
    // evictable), so a loaded machine may see none; when there were
    // refusals, however many, the log says so once.
    let refused = control["clients_refused"].as_u64().unwrap();
    let log = daemon.log_text();
    assert_eq!(
        log.matches("refused").count(),
        usize::from(refused >= 1),
        "{refused} refusals are logged once per interval: {log}"
    );
    // The flood's reply is never read: that client times out, having
    // been given one reply, not two thousand.
    wait_until("the unread flood client is closed", SYNC_TIMEOUT, || {
        daemon.status()["control"]["clients_closed_idle"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    let mut buf = [0u8; 64 * 1024];
    flood.set_nonblocking(false).unwrap();
    flood
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut drained = 0usize;
    while let Ok(len) = flood.read(&mut buf) {
        if len == 0 {
            break;
        }
        drained += len;
    }
    // What the kernel's socket buffer took, plus one reply: nowhere near
    // the 2,000 replies asked for.
    assert!(
        drained < 20 * 60_000,
        "the daemon queued {drained} reply bytes for an unread client"
    );
    stuck.clear();
    // Under the cross emulator the process is qemu, whose own memory
    // dwarfs the daemon's: the bound is checked on the host.
    if common::runner_argv().is_empty() {
        assert!(rss_kib() < 32 * 1024, "peak RSS {} KiB", rss_kib());
    }
}

#[test]
fn store_limits_are_daemon_flags_shown_in_status_and_enforced() {
    let dir = TempDir::new("limits");
    let port = unique_port().to_string();
    let daemon = Daemon::start(
        dir.path(),
        "gw",
        None,
        &[
            "--interface",
            "lo",
            "--port",
            &port,
            "--max-entries",
            "3",
            "--max-store-bytes",
            "100000",
            "--tombstone-lifetime-s",
            "3600",
        ],
    );
    let limits = daemon.status()["limits"].clone();
    assert_eq!(
        limits,
        serde_json::json!({"max_entries": 3, "max_store_bytes": 100000, "tombstone_lifetime_s": 3600})
    );
    for index in 0..3 {
        daemon.set(&format!("k/{index}"), "1");
    }
    let full = daemon.cli(&["set", "k/3", "1"]);
    assert_eq!(full.code, 1, "{full:?}");
    assert!(full.stderr.contains("store is full"), "{full:?}");
    let bad = gwsync(&["daemon", "--open", "--max-entries", "0"]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(
        bad.stderr.contains("--max-entries: expected 1 to"),
        "{bad:?}"
    );
    let keyless = gwsync(&[
        "daemon",
        "--socket",
        "/nonexistent/s",
        "--state-dir",
        "/nonexistent/d",
    ]);
    assert_eq!(keyless.code, 2, "{keyless:?}");
    assert!(keyless.stderr.contains("--key-file"), "{keyless:?}");
    assert!(keyless.stderr.contains("--open"), "{keyless:?}");
}

#[test]
fn status_shows_peers_in_sync_the_last_changes_and_persistence() {
    let dir = TempDir::new("status-contract");
    let mut daemons = group_on_lo(&dir, 2);
    for index in 0..20 {
        daemons[0].set(&format!("change/{index}"), &index.to_string());
    }
    daemons[0].cli(&["del", "change/0"]);
    wait_until("gw1 has the delete", SYNC_TIMEOUT, || {
        daemons[1].cli(&["get", "change/0"]).code == 3 && daemons[1].get("change/19").is_some()
    });
    // The writer records its own changes in the order it made them.
    let status = daemons[0].status();
    let origin = status["node_id"].clone();
    assert_eq!(status["last_change"]["key"], "change/0", "{status}");
    assert_eq!(status["last_change"]["deleted"], true);
    assert_eq!(status["last_change"]["origin"], origin);
    assert!(status["last_change"]["ms_ago"].is_u64());
    let recent = status["recent_changes"].as_array().unwrap();
    assert_eq!(recent.len(), 16);
    assert_eq!(recent[0], status["last_change"]);
    assert_eq!(recent[1]["key"], "change/19");
    assert_eq!(recent[1]["deleted"], false);
    // The other gateway lists them as they arrived (one datagram may carry
    // several, so not necessarily in write order), with their origin.
    let status = daemons[1].status();
    let recent = status["recent_changes"].as_array().unwrap();
    assert_eq!(recent.len(), 16, "{status}");
    assert!(
        recent.iter().any(|change| change["key"] == "change/0"
            && change["deleted"] == true
            && change["origin"] == origin),
        "{status}"
    );
    assert_eq!(
        status["persist"],
        serde_json::json!({"ok": true, "error": null, "unsaved_changes": status["persist"]["unsaved_changes"]})
    );
    // Each peer's last summary digest against ours: in sync once the
    // group is quiet again.
    wait_until("each sees the other in sync", SYNC_TIMEOUT, || {
        // A group in sync may stay quiet for a whole Trickle interval: a
        // sync request makes each announce its digest now.
        for daemon in &daemons {
            daemon.cli(&["trigger"]);
        }
        daemons.iter().all(|daemon| {
            let status = daemon.status();
            let peers = status["peers"].as_array().cloned().unwrap_or_default();
            peers.len() == 1
                && peers[0]["in_sync"] == true
                && peers[0]["digest"] == status["digest"]
        })
    });
    // With the peer stopped nothing can announce the new digest back, so
    // the divergence stays visible however slowly this host runs.
    daemons[0].terminate();
    daemons[1].set("diverge", "1");
    let status = daemons[1].status();
    assert_eq!(status["peers"][0]["in_sync"], false, "{status}");
    assert_ne!(status["peers"][0]["digest"], status["digest"], "{status}");
}

/// A writer and a reader driver on loopback, open (no key), sharing a
/// port of their own; the directory holds their state.
fn writer_and_reader(test: &str) -> (TempDir, gwsync::driver::Driver, gwsync::driver::Driver) {
    use gwsync::driver::{Driver, DriverConfig};
    let dir = TempDir::new(test);
    let port = unique_port();
    let open = |name: &str| {
        Driver::open(DriverConfig {
            interfaces: vec!["lo".to_owned()],
            port,
            state_dir: Some(dir.path().join(name)),
            open: true,
            ..DriverConfig::default()
        })
        .unwrap()
    };
    let writer = open("writer");
    let reader = open("reader");
    (dir, writer, reader)
}

/// Waits up to `timeout_ms` for the driver's socket (or its timer), then
/// lets it process.
fn poll_and_process(driver: &mut gwsync::driver::Driver, timeout_ms: u16) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::BorrowedFd;
    // SAFETY: the driver's epoll fd lives as long as the driver.
    let fd = unsafe { BorrowedFd::borrow_raw(driver.fd()) };
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::from(timeout_ms));
    driver.process();
}

/// A change heard from the group is handed out before the state write (two
/// fsyncs: milliseconds on a router's flash) rather than after it: the
/// write follows at the next `process`, which `timeout_ms` asks for at once.
#[test]
fn a_received_change_is_handed_out_before_the_state_is_written() {
    let (_dir, mut writer, mut reader) = writer_and_reader("change-before-save");
    writer.set("room/1", r#"{"on":true}"#).unwrap();
    writer.process();
    let mut writes_when_handed_out = None;
    wait_until("the reader hands out the write", SYNC_TIMEOUT, || {
        poll_and_process(&mut reader, 100);
        match reader.poll_change() {
            Some(change) => {
                assert_eq!(change.key, "room/1");
                writes_when_handed_out = Some(reader.counters().state_writes);
                true
            }
            None => false,
        }
    });
    let writes = writes_when_handed_out.unwrap();
    assert_eq!(reader.unsaved_changes(), 1);
    let wait = reader.timeout_ms().unwrap();
    assert!(
        wait <= gwsync::driver::SAVE_SETTLE_MS,
        "the state write is due at most {} ms after the change, not {wait}",
        gwsync::driver::SAVE_SETTLE_MS
    );
    wait_until("the reader writes its state", SYNC_TIMEOUT, || {
        let timeout = reader.timeout_ms().unwrap_or(100).min(100) as u16;
        poll_and_process(&mut reader, timeout);
        reader.counters().state_writes > writes
    });
    assert_eq!(reader.counters().state_writes, writes + 1);
    assert_eq!(reader.unsaved_changes(), 0);
}

/// A lone write's push leaves within `set`, before the caller is answered:
/// the reader hears it though the writer's loop never turns again (a reply
/// sent first wakes the client, and on a small CPU the push then waited
/// for the loop's next turn).
#[test]
fn a_lone_write_leaves_before_set_returns() {
    let (_dir, mut writer, mut reader) = writer_and_reader("lone-write-in-set");
    writer.set("room/1", r#"{"on":true}"#).unwrap();
    wait_until("the reader hears the write", SYNC_TIMEOUT, || {
        poll_and_process(&mut reader, 100);
        reader.get("room/1").is_some()
    });
    assert_eq!(reader.get("room/1").as_deref(), Some(r#"{"on":true}"#));
}

/// A control server in `dir`, run in-process as the daemon runs it, and
/// one client connected to it.
fn control_server_and_client(
    dir: &TempDir,
) -> (
    gwsync::control::ControlServer,
    std::os::unix::net::UnixStream,
) {
    let control = gwsync::control::ControlServer::bind(&dir.path().join("control.sock")).unwrap();
    let client = std::os::unix::net::UnixStream::connect(control.path()).unwrap();
    (control, client)
}

/// Requests sent together arrive in one read; the second and later ones
/// are answered on the loop's next turns, which the server asks for at
/// once. Before, poll waited for bytes that had already been read, and a
/// pipelined request sat until some timer fired (650 ms on a quiet
/// gateway, seconds later in Trickle's life).
#[test]
fn pipelined_requests_are_answered_without_waiting_for_a_timer() {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::{BufRead, BufReader, Write};
    const REQUESTS: usize = 3;
    let (dir, mut driver, _reader) = writer_and_reader("pipelined");
    let (mut control, mut client) = control_server_and_client(&dir);
    client
        .write_all(
            &br#"{"op":"get","key":"a"}
"#
            .repeat(REQUESTS),
        )
        .unwrap();
    client.set_nonblocking(true).unwrap();
    let mut replies = BufReader::new(client);
    let mut answered = 0;
    for turn in 0..4 * REQUESTS {
        let ready: Vec<bool> = {
            let wanted = control.poll_fds();
            let mut fds: Vec<PollFd<'_>> = wanted
                .iter()
                .map(|&(fd, _, wants_write)| {
                    let mut flags = PollFlags::POLLIN;
                    flags.set(PollFlags::POLLOUT, wants_write);
                    PollFd::new(fd, flags)
                })
                .collect();
            poll(&mut fds, PollTimeout::ZERO).unwrap();
            fds.iter()
                .map(|fd| fd.revents().is_some_and(|events| !events.is_empty()))
                .collect()
        };
        assert!(
            ready.contains(&true) || control.timeout_ms() == Some(0),
            "turn {turn}: {} request(s) unanswered, yet nothing would wake the server",
            REQUESTS - answered
        );
        control.process(&mut driver, &ready);
        let mut line = String::new();
        while replies.read_line(&mut line).is_ok_and(|len| len > 0) {
            assert!(line.contains(r#""error":"not_found""#), "{line}");
            answered += 1;
            line.clear();
        }
        if answered == REQUESTS {
            break;
        }
    }
    assert_eq!(answered, REQUESTS);
}

/// A request is answered before its bytes are taken from the socket:
/// taking them frees the client's send buffer, which wakes a client blocked
/// on the reply, and that wake must not come before a write's push has
/// left (on a small CPU the client preempted the daemon).
#[test]
fn a_write_leaves_before_its_request_is_taken_from_the_socket() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Mutex};
    /// Bytes the client sent that the daemon has not taken yet.
    fn unread_by_daemon(client: std::os::fd::RawFd) -> libc::c_int {
        let mut queued: libc::c_int = -1;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int; `client` is open.
        let result = unsafe { libc::ioctl(client, libc::TIOCOUTQ, &mut queued) };
        assert_eq!(result, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
        queued
    }
    let (dir, mut driver, _reader) = writer_and_reader("answer-then-take");
    let (mut control, mut client) = control_server_and_client(&dir);
    let client_fd = client.as_raw_fd();
    let unread_when_applied = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&unread_when_applied);
    driver.on_change(Some(Box::new(move |_| {
        *seen.lock().unwrap() = Some(unread_by_daemon(client_fd));
    })));
    let pushes_before = driver.status().counters.pushes_sent;
    client
        .write_all(b"{\"op\":\"set\",\"key\":\"room/1\",\"value\":1}\n")
        .unwrap();
    control.process(&mut driver, &[]);
    assert!(
        driver.status().counters.pushes_sent > pushes_before,
        "the push left"
    );
    let unread = unread_when_applied
        .lock()
        .unwrap()
        .expect("the write was applied");
    assert!(
        unread > 0,
        "the request was taken before the write was sent"
    );
    assert_eq!(
        unread_by_daemon(client_fd),
        0,
        "the request was taken after"
    );
    let mut reply = String::new();
    BufReader::new(client).read_line(&mut reply).unwrap();
    assert_eq!(reply.trim(), r#"{"ok":true}"#);
}

/// Sends `count` datagrams (not gwsync's: the reader counts and drops
/// them) to the group on loopback, where `reader` listens on `port`.
fn send_junk_to_group(port: u16, count: usize) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    socket
        .set_multicast_if_v4(&std::net::Ipv4Addr::LOCALHOST)
        .unwrap();
    let group = std::net::SocketAddrV4::new(gwsync::net::GROUP_V4_DEFAULT, port);
    for index in 0..count {
        socket
            .send_to(format!("junk {index}").as_bytes(), &group.into())
            .unwrap();
    }
}

fn readable_now(driver: &gwsync::driver::Driver) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::BorrowedFd;
    // SAFETY: the driver's epoll fd lives as long as the driver.
    let fd = unsafe { BorrowedFd::borrow_raw(driver.fd()) };
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
}

/// The daemon reads a datagram that came alone without the read that
/// would find the socket empty (a system call per datagram on every
/// receiver); one left behind keeps the fd readable, so the next wait
/// ends at once and nothing is lost. The C API's `process` still reads
/// everything waiting.
#[test]
fn a_lone_datagram_is_read_alone_and_nothing_is_left_behind() {
    use gwsync::driver::{Driver, Readiness};
    use gwsync::engine::DropReason;
    let (_dir, _writer, mut reader) = writer_and_reader("lone-datagram");
    let port = reader.config().port;
    // Every datagram read, and the junk among them (the reader's own
    // summaries may come back to it at any time).
    let read = |reader: &Driver| reader.engine().counters().datagrams_received;
    let junk = |reader: &Driver| -> u64 {
        let dropped = &reader.engine().counters().dropped;
        dropped
            .iter()
            .filter(|(reason, _)| matches!(reason, DropReason::Decode(_)))
            .map(|(_, count)| count)
            .sum()
    };
    send_junk_to_group(port, 3);
    reader.process();
    assert_eq!(junk(&reader), 3, "process reads all that waits");
    assert_eq!(reader.counters().recv_alone, 0);

    // The gap that makes the next datagram one that came alone is the
    // condition under test, so it is waited out.
    std::thread::sleep(Duration::from_millis(5));
    send_junk_to_group(port, 3);
    wait_until("the datagrams arrive", SYNC_TIMEOUT, || {
        readable_now(&reader)
    });
    let before = read(&reader);
    reader.process_ready(Readiness::UNKNOWN);
    assert_eq!(read(&reader), before + 1, "the first is read alone");
    assert_eq!(reader.counters().recv_alone, 1);
    assert!(readable_now(&reader), "the rest keep the fd readable");
    wait_until("the rest are read", SYNC_TIMEOUT, || {
        reader.process_ready(Readiness::UNKNOWN);
        junk(&reader) == 6
    });
}
