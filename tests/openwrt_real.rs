//! The package on OpenWrt 24.10's own userland: procd as PID 1, ubusd, logd,
//! netifd, uci, rc.common and hotplug-call built from their upstream sources
//! (tests/common/owrt.rs), configured only through uci and
//! /etc/init.d/gwsync. Needs root; skips under the cross emulator.

mod common;

use common::owrt::{Bridge, Flavor, Net, Router};
use std::time::Duration;

const SERVICE: &str = "ubus call service list '{\"name\":\"gwsync\"}'";
const WAIT: Duration = Duration::from_secs(20);

/// A router with the package in its image, booted, with lan up.
fn booted(test: &str) -> Option<Router> {
    let mut router = Router::new(test, Flavor::Base)?;
    router.install_package();
    router.enable_installed();
    router.boot(Net::Alone);
    router.wait_lan_up();
    Some(router)
}

/// The daemon's pid as procd reports it, once procd runs it and it answers.
fn daemon_pid(router: &Router) -> u32 {
    router.wait_for(
        "procd runs gwsync and it answers on its socket",
        WAIT,
        &format!(
            "{SERVICE} | jsonfilter -e '@.gwsync.instances.*.running' | grep -qx true && \
             gwsync --socket /var/run/gwsync.sock status > /dev/null"
        ),
    );
    router
        .sh_ok(&format!(
            "{SERVICE} | jsonfilter -e '@.gwsync.instances.*.pid'"
        ))
        .trim()
        .parse()
        .expect("pid")
}

/// Waits until procd runs a daemon other than `old`; returns its pid.
fn new_daemon_pid(router: &Router, old: u32) -> u32 {
    router.wait_for(
        &format!("procd runs a new gwsync (not pid {old})"),
        WAIT,
        &format!(
            "p=$({SERVICE} | jsonfilter -e '@.gwsync.instances.*.pid') && \
             [ -n \"$p\" ] && [ \"$p\" != {old} ] && \
             gwsync --socket /var/run/gwsync.sock status > /dev/null"
        ),
    );
    daemon_pid(router)
}

/// The daemon's command line as procd holds it.
fn command_line(router: &Router) -> Vec<String> {
    router
        .sh_ok(&format!(
            "{SERVICE} | jsonfilter -e '@.gwsync.instances.*.command[*]'"
        ))
        .lines()
        .map(str::to_owned)
        .collect()
}

fn words(list: &[&str]) -> Vec<String> {
    list.iter().map(|word| word.to_string()).collect()
}

/// The base command line of the shipped config with lan on eth0.
fn shipped_command(extra: &[&str]) -> Vec<String> {
    let mut command = words(&[
        "/usr/sbin/gwsync",
        "daemon",
        "--foreground",
        "--syslog",
        "--interface",
        "eth0",
        "--state-dir",
        "/etc/gwsync",
        "--socket",
        "/var/run/gwsync.sock",
        "--key-file",
        "/etc/gwsync.key",
    ]);
    command.extend(words(extra));
    command
}

fn mode(router: &Router, path: &str) -> String {
    router
        .sh_ok(&format!("stat -c %a {path}"))
        .trim()
        .to_owned()
}

fn key_of(router: &Router, path: &str) -> String {
    // Through the router: /var is on its own tmpfs.
    let text = router.sh_ok(&format!("cat {path}"));
    let key = text.trim().to_owned();
    assert_eq!(key.len(), 64, "{path} holds a 32-byte hex key: {text:?}");
    assert!(key.bytes().all(|byte| byte.is_ascii_hexdigit()), "{text:?}");
    key
}

/// `gwsync get KEY` on the router, when it succeeds.
fn get(router: &Router, key: &str) -> Option<String> {
    let result = router.sh(&format!("gwsync --socket /var/run/gwsync.sock get {key}"));
    (result.code == 0).then(|| result.stdout.trim().to_owned())
}

fn status(router: &Router) -> serde_json::Value {
    serde_json::from_str(&router.sh_ok("gwsync --socket /var/run/gwsync.sock status --json"))
        .expect("status JSON")
}

fn node_id(router: &Router) -> String {
    status(router)["node_id"]
        .as_str()
        .expect("node_id")
        .to_owned()
}

#[test]
fn boot_starts_the_enabled_service_with_a_fresh_key_and_the_uci_command_line() {
    let Some(router) = booted("boot") else {
        return;
    };
    assert!(router.path("/etc/rc.d/S95gwsync").exists(), "not enabled");
    assert_eq!(router.sh("/etc/init.d/gwsync enabled").code, 0);
    // The image's first boot ran the package's uci-defaults script.
    key_of(&router, "/etc/gwsync.key");
    assert_eq!(mode(&router, "/etc/gwsync.key"), "600");
    assert!(!router.path("/etc/uci-defaults/50-gwsync").exists());
    daemon_pid(&router);
    assert_eq!(command_line(&router), shipped_command(&[]));
}

#[test]
fn opkg_install_on_a_running_router_keeps_an_existing_key_enables_and_starts() {
    let Some(mut router) = Router::new("opkg", Flavor::Base) else {
        return;
    };
    router.boot(Net::Alone);
    router.wait_lan_up();
    // A key copied from another gateway before the install must stay.
    let existing = "ab".repeat(32);
    router.sh_ok(&format!("umask 077; echo {existing} > /etc/gwsync.key"));
    router.install_package();
    // What opkg runs after unpacking: the generated postinst, which runs
    // uci-defaults, enables and starts the init script.
    router.sh_ok("/usr/lib/opkg/info/gwsync.postinst");
    assert_eq!(key_of(&router, "/etc/gwsync.key"), existing);
    assert!(router.path("/etc/rc.d/S95gwsync").exists(), "not enabled");
    daemon_pid(&router);
    assert_eq!(command_line(&router), shipped_command(&[]));
}

#[test]
fn opkg_install_without_a_key_creates_one_readable_by_root_only() {
    let Some(mut router) = Router::new("opkg_key", Flavor::Base) else {
        return;
    };
    router.boot(Net::Alone);
    router.wait_lan_up();
    router.install_package();
    router.sh_ok("/usr/lib/opkg/info/gwsync.postinst");
    key_of(&router, "/etc/gwsync.key");
    assert_eq!(mode(&router, "/etc/gwsync.key"), "600");
    daemon_pid(&router);
}

#[test]
fn reload_config_applies_uci_changes_with_a_restart() {
    let Some(router) = booted("reload_config") else {
        return;
    };
    let old = daemon_pid(&router);
    router.sh_ok(
        "uci set gwsync.main.port=7400 && uci set gwsync.main.log_level=debug && \
         uci set gwsync.main.group=239.255.1.2 && uci commit gwsync && reload_config",
    );
    new_daemon_pid(&router, old);
    let mut expected = shipped_command(&[]);
    let key = expected.split_off(expected.len() - 2);
    expected.extend(words(&["--group", "239.255.1.2", "--port", "7400"]));
    expected.extend(key);
    expected.extend(words(&["--log-level", "debug"]));
    assert_eq!(command_line(&router), expected);
}

#[test]
fn uci_limits_and_open_mode_reach_the_daemon() {
    let Some(router) = booted("limits_open") else {
        return;
    };
    let old = daemon_pid(&router);
    router.sh_ok(
        "uci set gwsync.main.max_entries=500 && uci set gwsync.main.max_store_bytes=1048576 && \
         uci set gwsync.main.tombstone_lifetime_s=3600 && uci commit gwsync && reload_config",
    );
    let pid = new_daemon_pid(&router, old);
    let reported = status(&router);
    assert_eq!(reported["limits"]["max_entries"], 500, "{reported}");
    assert_eq!(reported["limits"]["max_store_bytes"], 1048576, "{reported}");
    assert_eq!(
        reported["limits"]["tombstone_lifetime_s"], 3600,
        "{reported}"
    );
    assert_eq!(reported["key_state"], "keyed", "{reported}");
    // Open mode: no key at all, asked for explicitly.
    router.sh_ok(
        "uci delete gwsync.main.key_file && uci set gwsync.main.open=1 && \
         uci commit gwsync && reload_config",
    );
    new_daemon_pid(&router, pid);
    assert_eq!(status(&router)["key_state"], "open");
    assert!(command_line(&router).contains(&"--open".to_owned()));
}

#[test]
fn inline_key_is_copied_to_a_root_only_file_not_to_argv() {
    let Some(router) = booted("inline_key") else {
        return;
    };
    let old = daemon_pid(&router);
    let key = "cd".repeat(32);
    router.sh_ok(&format!(
        "uci delete gwsync.main.key_file && uci set gwsync.main.key={key} && \
         uci commit gwsync && reload_config"
    ));
    let pid = new_daemon_pid(&router, old);
    assert_eq!(key_of(&router, "/var/run/gwsync/key"), key);
    assert_eq!(mode(&router, "/var/run/gwsync/key"), "600");
    let command = command_line(&router);
    assert_eq!(
        command[command.len() - 2..],
        words(&["--key-file", "/var/run/gwsync/key"])
    );
    let argv = router.sh_ok(&format!("tr '\\0' ' ' < /proc/{pid}/cmdline"));
    assert!(!argv.contains(&key), "key in argv: {argv}");
    // Stopping drops the copy.
    router.sh_ok("/etc/init.d/gwsync stop");
    assert!(!router.path("/var/run/gwsync/key").exists());
}

#[test]
fn procd_respawns_a_killed_daemon() {
    let Some(router) = booted("respawn") else {
        return;
    };
    let old = daemon_pid(&router);
    router.sh_ok(&format!("kill -9 {old}"));
    new_daemon_pid(&router, old);
    assert_eq!(command_line(&router), shipped_command(&[]));
}

#[test]
fn hotplug_ifup_event_triggers_a_sync_in_the_running_daemon() {
    let Some(router) = booted("hotplug") else {
        return;
    };
    daemon_pid(&router);
    let opens = "gwsync --socket /var/run/gwsync.sock status --json | jsonfilter -e '@.counters.socket_opens'";
    let before: u64 = router.sh_ok(opens).trim().parse().expect("socket_opens");
    // netifd's event for lan, through the real hotplug-call: the daemon
    // takes a network-up trigger, which also opens a fresh socket.
    router.sh_ok("ACTION=ifupdate INTERFACE=lan DEVICE=eth0 /sbin/hotplug-call iface");
    router.wait_for(
        "the hotplug script logged the trigger",
        WAIT,
        "logread -e gwsync | grep -q 'ifupdate on lan (eth0): triggering a sync'",
    );
    router.wait_for(
        "the daemon took the network-up trigger (a fresh socket)",
        WAIT,
        &format!("[ \"$({opens})\" -gt {before} ]"),
    );
    let log = router.sh_ok("logread -e gwsync");
    assert!(!log.contains("failed"), "{log}");
}

#[test]
fn netifd_address_change_reaches_the_running_daemon_through_hotplug() {
    let Some(router) = booted("netifd_ifupdate") else {
        return;
    };
    let pid = daemon_pid(&router);
    let opens = "gwsync --socket /var/run/gwsync.sock status --json | jsonfilter -e '@.counters.socket_opens'";
    let before: u64 = router.sh_ok(opens).trim().parse().expect("socket_opens");
    // A new address on lan: netifd restarts the interface (down, up within
    // procd's trigger delay, so the daemon keeps running) and sends ifup
    // itself, through hotplug-call to the package's script.
    router.sh_ok("uci set network.lan.ipaddr=10.73.0.9 && uci commit network && reload_config");
    router.wait_for(
        "the hotplug script logged netifd's ifup",
        WAIT,
        "logread -e gwsync | grep -q 'ifup on lan (eth0): triggering a sync'",
    );
    router.wait_for(
        "the daemon took the network-up trigger (a fresh socket)",
        WAIT,
        &format!("[ \"$({opens})\" -gt {before} ]"),
    );
    assert_eq!(daemon_pid(&router), pid, "restarted for a new address");
}

#[test]
fn netifd_ifdown_stops_and_ifup_starts_the_daemon() {
    let Some(router) = booted("ifdown_ifup") else {
        return;
    };
    let old = daemon_pid(&router);
    router.sh_ok("ifdown lan");
    router.wait_for(
        "procd has no gwsync instance while lan is down",
        WAIT,
        &format!("! {SERVICE} | jsonfilter -e '@.gwsync.instances.*.pid' | grep -q ."),
    );
    router.sh_ok("ifup lan");
    router.wait_lan_up();
    new_daemon_pid(&router, old);
    assert_eq!(command_line(&router), shipped_command(&[]));
}

#[test]
fn a_recreated_netdev_gets_a_new_daemon() {
    let Some(router) = booted("netdev") else {
        return;
    };
    let old = daemon_pid(&router);
    router.ip(&["link", "del", "eth0"]);
    router.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    router.ip(&["link", "set", "eth0p", "up"]);
    router.wait_lan_up();
    new_daemon_pid(&router, old);
    assert_eq!(command_line(&router), shipped_command(&[]));
}

#[test]
fn stop_and_disable() {
    let Some(router) = booted("stop_disable") else {
        return;
    };
    let pid = daemon_pid(&router);
    router.sh_ok("/etc/init.d/gwsync stop");
    router.wait_for(
        "the daemon is gone",
        WAIT,
        &format!("! kill -0 {pid} 2> /dev/null"),
    );
    assert_eq!(router.sh("/etc/init.d/gwsync running").code, 1);
    router.sh_ok("/etc/init.d/gwsync disable");
    assert!(!router.path("/etc/rc.d/S95gwsync").exists());
    assert_eq!(router.sh("/etc/init.d/gwsync enabled").code, 1);
}

#[test]
fn log_lines_reach_syslog_at_their_priority_with_one_tag() {
    let Some(router) = booted("log") else {
        return;
    };
    let old = daemon_pid(&router);
    // A key file others can read: the daemon warns about it.
    router.sh_ok("chmod 644 /etc/gwsync.key && /etc/init.d/gwsync restart");
    let pid = new_daemon_pid(&router, old);
    let tag = format!("gwsync[{pid}]:");
    router.wait_for(
        "the daemon's warning is in the log",
        WAIT,
        &format!("logread | grep -F '{tag}' | grep -q 'daemon.warn'"),
    );
    let log = router.sh_ok("logread");
    let lines: Vec<&str> = log.lines().filter(|line| line.contains(&tag)).collect();
    let info = lines
        .iter()
        .find(|line| line.contains("serving /var/run/gwsync.sock"))
        .unwrap_or_else(|| panic!("no start line in:\n{log}"));
    assert!(info.contains(" daemon.info "), "{info}");
    let warn = lines
        .iter()
        .find(|line| line.contains("key file /etc/gwsync.key"))
        .unwrap_or_else(|| panic!("no key file warning in:\n{log}"));
    assert!(warn.contains(" daemon.warn "), "{warn}");
    for line in &lines {
        assert_eq!(line.matches("gwsync[").count(), 1, "tag twice: {line}");
        assert!(!line.contains(" daemon.err "), "an error logged: {line}");
    }
}

#[test]
fn reload_after_only_the_key_file_changed_signals_instead_of_restarting() {
    let Some(router) = booted("key_reload") else {
        return;
    };
    let pid = daemon_pid(&router);
    router.sh_ok(&format!(
        "umask 077 && echo {} > /etc/gwsync.key && /etc/init.d/gwsync reload",
        "ef".repeat(32)
    ));
    router.wait_for(
        "the init script sent SIGHUP",
        WAIT,
        "logread -e gwsync | grep -q 'key file changed: asking the daemon to re-read it'",
    );
    router.wait_for(
        "the daemon re-read its keys on SIGHUP",
        WAIT,
        &format!("logread | grep 'gwsync\\[{pid}\\]' | grep -q 'SIGHUP: reloading the group keys'"),
    );
    assert_eq!(daemon_pid(&router), pid, "restarted instead of signalled");
    // A reload with nothing changed does neither.
    router.sh_ok("/etc/init.d/gwsync reload");
    assert_eq!(
        router
            .sh_ok("logread -e gwsync")
            .matches("key file changed")
            .count(),
        1
    );
    assert_eq!(daemon_pid(&router), pid);
}

/// Two routers with the package on one bridge, sharing the key the first
/// one's install created, on a port of their own set through uci.
fn two_routers(test: &str) -> Option<(Router, Router, Bridge)> {
    let mut a = Router::new(&format!("{test}_a"), Flavor::Base)?;
    let mut b = Router::new(&format!("{test}_b"), Flavor::Base)?;
    let bridge = Bridge::new();
    a.install_package();
    a.enable_installed();
    // The same group key on both: b's uci-defaults keeps a's copy.
    std::fs::copy(a.path("/etc/gwsync.key"), b.path("/etc/gwsync.key")).unwrap();
    b.install_package();
    b.enable_installed();
    let port = common::unique_port();
    for (router, index) in [(&mut a, 0), (&mut b, 1)] {
        router.boot(bridge.port(index));
        router.wait_lan_up();
        let old = daemon_pid(router);
        router.sh_ok(&format!(
            "uci set gwsync.main.port={port} && uci commit gwsync && /etc/init.d/gwsync reload"
        ));
        new_daemon_pid(router, old);
    }
    Some((a, b, bridge))
}

/// Waits until `gwsync get KEY` on `router` prints `value`.
fn wait_value(router: &Router, key: &str, value: &str) {
    router.wait_for(
        &format!("{key} = {value} on {}", router.name),
        WAIT,
        &format!("[ \"$(gwsync --socket /var/run/gwsync.sock get {key})\" = '{value}' ]"),
    )
}

/// Two routers on one bridge, configured only through uci and the init
/// script: a write on one is read on the other; after `ifdown lan; ifup lan`
/// the second is brought up to date at once; a reboot keeps data and node id.
#[test]
fn two_routers_sync_through_ifdown_ifup_and_reboot() {
    let Some((a, mut b, _bridge)) = two_routers("two") else {
        return;
    };
    let wait = wait_value;
    a.sh_ok("gwsync --socket /var/run/gwsync.sock set home/name '\"flat\"'");
    wait(&b, "home/name", "\"flat\"");

    b.sh_ok("ifdown lan");
    a.sh_ok("gwsync --socket /var/run/gwsync.sock set home/rooms 3");
    b.sh_ok("ifup lan");
    b.wait_lan_up();
    wait(&b, "home/rooms", "3");

    let id = node_id(&b);
    b.reboot_clean();
    b.wait_lan_up();
    daemon_pid(&b);
    assert_eq!(get(&b, "home/name").as_deref(), Some("\"flat\""));
    assert_eq!(get(&b, "home/rooms").as_deref(), Some("3"));
    assert_eq!(node_id(&b), id);
    a.sh_ok("gwsync --socket /var/run/gwsync.sock set home/scene '\"night\"'");
    wait(&b, "home/scene", "\"night\"");
}

#[test]
fn opkg_remove_stops_and_disables() {
    let Some(router) = booted("opkg_remove") else {
        return;
    };
    let pid = daemon_pid(&router);
    // What opkg runs before removing the files: the generated prerm.
    router.sh_ok("/usr/lib/opkg/info/gwsync.prerm");
    router.wait_for(
        "the daemon is gone",
        WAIT,
        &format!("! kill -0 {pid} 2> /dev/null"),
    );
    assert!(
        !router.path("/etc/rc.d/S95gwsync").exists(),
        "still enabled"
    );
}

/// A key change without downtime, through uci's files and the init script
/// only: both gateways get a file with the new key first and the old one
/// second (send new, accept both), reload (SIGHUP, no restart), then the new
/// key alone. Writes keep flowing at every step.
#[test]
fn two_routers_change_their_key_with_reload_and_no_restart() {
    let Some((a, b, _bridge)) = two_routers("rekey") else {
        return;
    };
    let pids = [daemon_pid(&a), daemon_pid(&b)];
    a.sh_ok("gwsync --socket /var/run/gwsync.sock set step 1");
    wait_value(&b, "step", "1");
    let old = a.sh_ok("cat /etc/gwsync.key").trim().to_owned();
    let new = a.sh_ok("gwsync genkey").trim().to_owned();
    assert_ne!(old, new);
    for (keys, step) in [(format!("{new}\n{old}"), 2), (new.clone(), 3)] {
        for router in [&a, &b] {
            router.sh_ok(&format!(
                "umask 077 && printf '%s\\n' '{}' > /etc/gwsync.key && /etc/init.d/gwsync reload",
                keys.replace('\n', "' '")
            ));
        }
        a.sh_ok(&format!(
            "gwsync --socket /var/run/gwsync.sock set step {step}"
        ));
        wait_value(&b, "step", &step.to_string());
        b.sh_ok(&format!(
            "gwsync --socket /var/run/gwsync.sock set back {step}"
        ));
        wait_value(&a, "back", &step.to_string());
    }
    assert_eq!([daemon_pid(&a), daemon_pid(&b)], pids, "a daemon restarted");
    for router in [&a, &b] {
        let log = router.sh_ok("logread -e gwsync");
        assert_eq!(
            log.matches("SIGHUP: reloading the group keys").count(),
            2,
            "{log}"
        );
    }
}
