//! One daemon per network namespace, the namespaces joined by a bridge:
//! the closest a single machine gets to gateways on a LAN. Needs root (CI
//! runs as root); without it every test prints SKIP and passes.

mod common;

use std::time::Duration;

use common::{Daemon, Lan, TempDir, unique_port, wait_all_have, wait_until};

const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn write_anywhere_read_everywhere() {
    let Some(lan) = Lan::connected("write_anywhere_read_everywhere", 4) else {
        return;
    };
    let dir = TempDir::new("ns-anywhere");
    let daemons = lan.start_all(dir.path(), unique_port(), &[]);
    for (index, daemon) in daemons.iter().enumerate() {
        daemon.set(&format!("from/{index}"), &format!("{{\"gw\":{index}}}"));
    }
    for index in 0..daemons.len() {
        wait_all_have(
            &daemons,
            &format!("from/{index}"),
            &format!("{{\"gw\":{index}}}"),
            SYNC_TIMEOUT,
        );
    }
}

#[test]
fn a_killed_daemon_catches_up_and_keeps_its_own_data() {
    let Some(lan) = Lan::connected("a_killed_daemon_catches_up_and_keeps_its_own_data", 3) else {
        return;
    };
    let dir = TempDir::new("ns-kill");
    let mut daemons = lan.start_all(dir.path(), unique_port(), &[]);
    daemons[2].set("own/2", r#""mine""#);
    wait_all_have(&daemons, "own/2", r#""mine""#, SYNC_TIMEOUT);
    let state = daemons[2].state_dir.join("state.json");
    wait_until("gw2 has saved own/2", SYNC_TIMEOUT, || {
        std::fs::read_to_string(&state).is_ok_and(|text| text.contains("own/2"))
    });
    daemons[2].kill9();
    daemons[0].set("while/away", "42");
    daemons[2].restart();
    assert!(
        daemons[2].log_text().contains("restored 1 entries"),
        "{}",
        daemons[2].log_text()
    );
    assert_eq!(daemons[2].get("own/2").as_deref(), Some(r#""mine""#));
    wait_all_have(&daemons, "while/away", "42", SYNC_TIMEOUT);
}

#[test]
fn a_link_that_goes_down_and_up_rejoins_by_itself() {
    let Some(lan) = Lan::connected("a_link_that_goes_down_and_up_rejoins_by_itself", 3) else {
        return;
    };
    let dir = TempDir::new("ns-link");
    let daemons = lan.start_all(dir.path(), unique_port(), &[]);
    daemons[0].set("before", "1");
    wait_all_have(&daemons, "before", "1", SYNC_TIMEOUT);
    lan.link(2, false);
    wait_until("gw2 sees its link down", SYNC_TIMEOUT, || {
        daemons[2].status()["interfaces"][0]["up"] == false
    });
    daemons[0].set("during", "2");
    daemons[2].set("offline/write", "3");
    lan.link(2, true);
    wait_all_have(&daemons, "during", "2", SYNC_TIMEOUT);
    wait_all_have(&daemons, "offline/write", "3", SYNC_TIMEOUT);
    assert!(daemons[2].log_text().contains("eth0 is up again"));
}

#[test]
fn twenty_percent_loss_everywhere_still_converges() {
    let Some(lan) = Lan::connected("twenty_percent_loss_everywhere_still_converges", 4) else {
        return;
    };
    if !common::tool_found("nft") {
        common::skip("nft is not installed (apt-get install nftables): it drops the packets");
        return;
    }
    let port = unique_port();
    for index in 0..lan.nodes.len() {
        lan.inject_loss(index, 20, port);
    }
    let dir = TempDir::new("ns-loss");
    let daemons = lan.start_all(dir.path(), port, &[]);
    for round in 0..5 {
        for (index, daemon) in daemons.iter().enumerate() {
            daemon.set(&format!("k/{index}/{round}"), &format!("{round}"));
        }
    }
    for round in 0..5 {
        for index in 0..daemons.len() {
            wait_all_have(
                &daemons,
                &format!("k/{index}/{round}"),
                &format!("{round}"),
                Duration::from_secs(120),
            );
        }
    }
    let digests: Vec<_> = daemons
        .iter()
        .map(|daemon| daemon.status()["digest"].clone())
        .collect();
    assert!(
        digests.windows(2).all(|pair| pair[0] == pair[1]),
        "{digests:?}"
    );
}

#[test]
fn a_daemon_started_before_its_interface_joins_when_it_appears() {
    let Some(lan) = Lan::new(
        "a_daemon_started_before_its_interface_joins_when_it_appears",
        3,
    ) else {
        return;
    };
    lan.connect(0, true);
    lan.connect(1, true);
    let dir = TempDir::new("ns-late");
    let port = unique_port();
    let early: Vec<Daemon> = (0..2)
        .map(|index| lan.start(index, dir.path(), port, &[]))
        .collect();
    let late = lan.start(2, dir.path(), port, &[]);
    wait_until("gw2 says eth0 is missing", SYNC_TIMEOUT, || {
        late.log_text().contains("does not exist")
    });
    early[0].set("written/before", r#"{"a":1}"#);
    lan.connect(2, true);
    wait_until("gw2 gets the earlier write", SYNC_TIMEOUT, || {
        late.get("written/before").as_deref() == Some(r#"{"a":1}"#)
    });
    late.set("written/late", "true");
    wait_all_have(&early, "written/late", "true", SYNC_TIMEOUT);
    assert_eq!(
        late.log_text().matches("does not exist").count(),
        1,
        "logged once"
    );
}

#[test]
fn ipv6_link_local_only_lan_syncs() {
    let Some(lan) = Lan::new("ipv6_link_local_only_lan_syncs", 3) else {
        return;
    };
    for index in 0..lan.nodes.len() {
        lan.connect(index, false);
    }
    for index in 0..lan.nodes.len() {
        lan.wait_ipv6_ready(index);
    }
    let dir = TempDir::new("ns-v6");
    let daemons = lan.start_all(dir.path(), unique_port(), &["--group", "ff02::7373"]);
    daemons[1].set("v6", r#""link-local""#);
    wait_all_have(&daemons, "v6", r#""link-local""#, SYNC_TIMEOUT);
    daemons[2].set("v6/back", "1");
    wait_all_have(&daemons, "v6/back", "1", SYNC_TIMEOUT);
    assert_eq!(daemons[0].status()["group"], "ff02::7373");
}

#[test]
fn a_truncated_state_file_is_set_aside_and_the_data_resyncs() {
    let Some(lan) = Lan::connected(
        "a_truncated_state_file_is_set_aside_and_the_data_resyncs",
        2,
    ) else {
        return;
    };
    let dir = TempDir::new("ns-corrupt");
    let mut daemons = lan.start_all(dir.path(), unique_port(), &[]);
    for index in 0..20 {
        daemons[0].set(&format!("data/{index}"), &format!("{{\"i\":{index}}}"));
    }
    wait_all_have(&daemons, "data/19", r#"{"i":19}"#, SYNC_TIMEOUT);
    daemons[1].terminate();
    let state = daemons[1].state_dir.join("state.json");
    let bytes = std::fs::read(&state).unwrap();
    assert!(String::from_utf8_lossy(&bytes).contains("data/19"));
    std::fs::write(&state, &bytes[..bytes.len() / 2]).unwrap();
    daemons[1].restart();
    let log = daemons[1].log_text();
    assert!(
        log.contains("is corrupt") && log.contains("moved it to"),
        "{log}"
    );
    let set_aside = std::fs::read_dir(&daemons[1].state_dir)
        .unwrap()
        .filter_map(Result::ok)
        .any(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        });
    assert!(set_aside, "the corrupt file is kept for inspection");
    for index in 0..20 {
        wait_all_have(
            &daemons,
            &format!("data/{index}"),
            &format!("{{\"i\":{index}}}"),
            SYNC_TIMEOUT,
        );
    }
}

/// The fingerprint `status` shows for the key `hex`.
fn fingerprint(hex: &str) -> String {
    let key: gwsync::crypto::GroupKey = hex.parse().unwrap();
    gwsync::hex::encode(&key.fingerprint())
}

#[test]
fn keys_rotate_on_three_live_gateways_without_losing_a_write_or_isolating_one() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let Some(lan) = Lan::connected(
        "keys_rotate_on_three_live_gateways_without_losing_a_write_or_isolating_one",
        3,
    ) else {
        return;
    };
    let dir = TempDir::new("ns-rotate");
    let old = common::gwsync(&["genkey"]).stdout.trim().to_owned();
    let new = common::gwsync(&["genkey"]).stdout.trim().to_owned();
    let key_files: Vec<_> = (0..3)
        .map(|index| dir.path().join(format!("gw{index}.key")))
        .collect();
    let write_keys = |index: usize, keys: &[&str]| {
        use std::os::unix::fs::PermissionsExt;
        let path = &key_files[index];
        // Written aside and renamed in, as an admin's editor or scp does:
        // a reload never reads half a file.
        let temp = path.with_extension("new");
        std::fs::write(&temp, keys.join("\n") + "\n").unwrap();
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&temp, path).unwrap();
    };
    for index in 0..3 {
        write_keys(index, &[&old]);
    }
    let port = unique_port();
    let daemons: Arc<Vec<Daemon>> = Arc::new(
        (0..3)
            .map(|index| {
                let key_file = key_files[index].to_str().unwrap();
                lan.start(index, dir.path(), port, &["--key-file", key_file])
            })
            .collect(),
    );

    // Writes keep flowing on every gateway in turn during the whole rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (daemons, stop, acknowledged) = (daemons.clone(), stop.clone(), acknowledged.clone());
        std::thread::spawn(move || {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("flow/{n}");
                if daemons[n % 3].cli(&["set", &key, &n.to_string()]).code == 0 {
                    acknowledged.lock().unwrap().push((key, n));
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // The documented procedure: add the next key everywhere (still sending
    // the old one), switch senders, remove the old key. Each gateway is
    // changed on its own, half of them by SIGHUP, half by `gwsync reload`.
    let steps: [&[&str]; 3] = [&[&old, &new], &[&new, &old], &[&new]];
    let mut reloads = 0;
    for (step, keys) in steps.iter().enumerate() {
        for index in 0..3 {
            write_keys(index, keys);
            if reloads % 2 == 0 {
                let pid = nix::unistd::Pid::from_raw(daemons[index].pid() as i32);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
            } else {
                let reply = daemons[index].cli(&["reload"]);
                assert_eq!(reply.code, 0, "{reply:?}");
            }
            reloads += 1;
            let sending = fingerprint(keys[0]);
            wait_until(
                &format!("gw{index} sends with the key of step {step}"),
                SYNC_TIMEOUT,
                || {
                    let status = daemons[index].status();
                    status["keys"][0]["fingerprint"] == sending.as_str()
                        && status["keys"].as_array().map(Vec::len) == Some(keys.len())
                },
            );
            // Writes keep being acknowledged across this change.
            let flowing = acknowledged.lock().unwrap().len() + 3;
            wait_until("writes flow while the keys change", SYNC_TIMEOUT, || {
                acknowledged.lock().unwrap().len() >= flowing
            });
            // No gateway is cut off at any point: a write on each one
            // reaches the two others.
            for (from, daemon) in daemons.iter().enumerate() {
                let marker = format!("marker/{step}/{index}/{from}");
                daemon.set(&marker, "true");
                wait_all_have(&daemons, &marker, "true", SYNC_TIMEOUT);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 27, "{}", acknowledged.len());
    for daemon in daemons.iter() {
        wait_until(
            &format!("{} has every acknowledged write", daemon.name),
            SYNC_TIMEOUT,
            || {
                let dump: serde_json::Value =
                    serde_json::from_str(&daemon.cli(&["dump"]).stdout).unwrap_or_default();
                acknowledged
                    .iter()
                    .all(|(key, n)| dump[key.as_str()] == serde_json::json!(n))
            },
        );
        let status = daemon.status();
        assert_eq!(
            status["counters"]["other_key_datagrams"], 0,
            "{} heard a datagram no key of its opened: {status}",
            daemon.name
        );
        assert_eq!(status["counters"]["key_reloads"], 3, "{status}");
        assert_eq!(
            status["peers"].as_array().map(Vec::len),
            Some(2),
            "{status}"
        );
    }
}
