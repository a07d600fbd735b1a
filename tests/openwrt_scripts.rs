//! The OpenWrt packaging, tested off the device.
//!
//! `init.d/gwsync` and `openwrt/gwsync/files/gwsync.hotplug` run unchanged under
//! busybox ash (the shell OpenWrt has) against the stand-ins in
//! `tests/openwrt/`: a uci parser, a network map and a procd API that records
//! its calls. `IPKG_INSTROOT` points the scripts at a temporary root holding
//! those stand-ins; on a device it is empty. The procd calls are folded into
//! the service procd would receive (instances with their parameters, and the
//! triggers) and compared whole, so an extra or missing parameter fails.
//!
//! `openwrt/gwsync/Makefile` cannot be built without the OpenWrt SDK, so it is
//! checked statically for what the packages feed's Rust helpers and review
//! rules need, and its recipes are run by GNU make against a minimal
//! stand-in of the SDK's make includes.
//!
//! busybox, shfmt, shellcheck and make are external tools: when one is missing
//! the test that needs it is skipped with a message, except under CI (`CI`
//! set), where it fails.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const PROG: &str = "/usr/sbin/gwsync";
const SOCKET: &str = "/var/run/gwsync.sock";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The path of `name` on PATH. A missing tool skips the calling test (returns
/// None after saying so) unless CI is set: CI installs the tools, so there a
/// missing one is a broken job, not a reason to pass.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| {
                p.metadata()
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
    });
    if found.is_none() {
        common::skip(&format!(
            "`{name}` is not installed (Debian: apt-get install {name})"
        ));
    }
    found
}

// ---------------------------------------------------------------- sandbox

/// A temporary OpenWrt-like root: the stand-ins, the production scripts at
/// their on-device paths, stub `logger`/`gwsync`, and busybox applets as the
/// only other commands on PATH (so a GNU-only option in a script fails here
/// as it would on a router).
struct Root {
    dir: PathBuf,
    busybox: PathBuf,
}

impl Root {
    fn new(test: &str) -> Option<Root> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let busybox = tool("busybox")?;
        if let Some(why) = busybox_prefers_applets(&busybox) {
            common::skip(&why);
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "gwsync-openwrt-{}-{}-{test}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        copy_tree(&repo().join("tests/openwrt/root"), &dir);
        let fixture = dir.join(".fixture");
        for sub in ["bin", "busybox"] {
            fs::create_dir_all(fixture.join(sub)).unwrap();
        }
        for stub in ["logger", "gwsync"] {
            copy_file(
                &repo().join("tests/openwrt/bin").join(stub),
                &fixture.join("bin").join(stub),
            );
        }
        let list = Command::new(&busybox).arg("--list").output().unwrap();
        assert!(list.status.success(), "busybox --list failed");
        for applet in String::from_utf8(list.stdout).unwrap().lines() {
            if !applet.is_empty() {
                symlink(&busybox, fixture.join("busybox").join(applet)).unwrap();
            }
        }
        copy_file(
            &repo().join("init.d/gwsync"),
            &dir.join("etc/init.d/gwsync"),
        );
        copy_file(
            &repo().join("openwrt/gwsync/files/gwsync.hotplug"),
            &dir.join("etc/hotplug.d/iface/95-gwsync"),
        );
        Some(Root { dir, busybox })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel.trim_start_matches('/'))
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn config(&self, text: &str) {
        self.write("/etc/config/gwsync", text);
    }

    /// netifd's view: which logical networks have which L3 device.
    fn networks(&self, map: &[(&str, &str)]) {
        let text: String = map.iter().map(|(n, d)| format!("{n} {d}\n")).collect();
        self.write("/.fixture/network", &text);
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.busybox);
        cmd.env_clear()
            .env("IPKG_INSTROOT", &self.dir)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.path("/.fixture/bin").display(),
                    self.path("/.fixture/busybox").display()
                ),
            )
            .stdin(Stdio::null());
        cmd
    }

    /// `/etc/init.d/gwsync ACTION`, which OpenWrt runs as
    /// `/bin/sh /etc/rc.common /etc/init.d/gwsync ACTION`.
    fn init(&self, action: &str) -> Output {
        let out = self
            .command()
            .arg("ash")
            .arg(self.path("/etc/rc.common"))
            .arg(self.path("/etc/init.d/gwsync"))
            .arg(action)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init.d/gwsync {action} failed: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs the hotplug script the way hotplug-call does: sourced in a
    /// subshell, with the event in the environment. Returns how long it took.
    fn hotplug(&self, env: &[(&str, &str)]) -> Duration {
        let mut cmd = self.command();
        cmd.args(["ash", "-c", "( . \"$1\" )", "hotplug-call"])
            .arg(self.path("/etc/hotplug.d/iface/95-gwsync"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let start = Instant::now();
        let out = cmd.output().unwrap();
        let took = start.elapsed();
        assert!(
            out.status.success(),
            "hotplug script failed: {:?}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        took
    }

    /// A listening socket where the daemon's control socket would be.
    fn daemon_socket(&self) -> UnixListener {
        let p = self.path(SOCKET);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        UnixListener::bind(&p).unwrap_or_else(|e| panic!("bind {}: {e}", p.display()))
    }

    fn lines(&self, rel: &str) -> Vec<String> {
        match fs::read_to_string(self.path(rel)) {
            Ok(text) => text.lines().map(str::to_owned).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("read {rel}: {e}"),
        }
    }

    fn calls(&self, rel: &str) -> Vec<Vec<String>> {
        self.lines(rel)
            .iter()
            .map(|l| l.split('\x1f').map(str::to_owned).collect())
            .collect()
    }

    fn logs(&self) -> Vec<String> {
        self.lines("/.fixture/logger.log")
    }

    fn gwsync_calls(&self) -> Vec<Vec<String>> {
        self.calls("/.fixture/gwsync.log")
    }

    /// What procd was sent by the last run: the procd log is cleared so that
    /// each call of this sees one run only.
    fn take_service(&self) -> Service {
        let mut services = self.take_services();
        assert_eq!(services.len(), 1, "services sent to procd: {services:?}");
        services.remove(0)
    }

    /// Every service sent to procd since the last take, in order.
    fn take_services(&self) -> Vec<Service> {
        let calls = self.calls("/.fixture/procd.log");
        let _ = fs::remove_file(self.path("/.fixture/procd.log"));
        let mut services: Vec<Vec<Vec<String>>> = Vec::new();
        for call in calls {
            match services.last_mut() {
                Some(service) if call[0] != "procd_open_service" => service.push(call),
                _ => services.push(vec![call]),
            }
        }
        services
            .iter()
            .map(|calls| Service::from_calls(calls))
            .collect()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        // Removed after a failure too: the assertions print what they saw,
        // and failed runs must not fill /tmp.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Why this busybox cannot run the stand-ins, if it cannot: a build with
/// FEATURE_PREFER_APPLETS / SH_STANDALONE (Debian's `busybox-static`) runs
/// its own `logger` and other applets ahead of PATH, so the recording
/// stand-ins are never called and the tests would fail with empty logs.
fn busybox_prefers_applets(busybox: &Path) -> Option<String> {
    let dir = std::env::temp_dir().join(format!(
        "gwsync-openwrt-probe-{}-{}",
        std::process::id(),
        common::unique()
    ));
    fs::create_dir_all(&dir).unwrap();
    let stub = dir.join("logger");
    fs::write(&stub, "#!/bin/sh\necho stand-in\n").unwrap();
    fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(busybox)
        .env_clear()
        .env("PATH", &dir)
        .args(["ash", "-c", "logger probe"])
        .stdin(Stdio::null())
        .output();
    let _ = fs::remove_dir_all(&dir);
    let ran_stub = out.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("stand-in"));
    (!ran_stub).then(|| {
        format!(
            "{} runs its own applets ahead of PATH (a build with FEATURE_PREFER_APPLETS, \
             like Debian's busybox-static), so the OpenWrt stand-ins cannot be used; \
             install the dynamic build (apt-get install busybox) or put one first on PATH",
            busybox.display()
        )
    })
}

fn copy_file(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            copy_file(&entry.path(), &target);
        }
    }
}

// ---------------------------------------------------------------- procd model

/// One `procd_open_instance` ... `procd_close_instance` block: each
/// parameter's final value (set replaces, append extends), as procd gets it.
#[derive(Debug, PartialEq, Default)]
struct Instance {
    params: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, PartialEq, Default)]
struct Service {
    instances: Vec<Instance>,
    /// Each trigger call with its arguments, function name first.
    triggers: Vec<Vec<String>>,
}

impl Service {
    fn from_calls(calls: &[Vec<String>]) -> Service {
        assert!(!calls.is_empty(), "no procd calls recorded");
        assert_eq!(calls[0][0], "procd_open_service", "calls: {calls:?}");
        assert_eq!(calls[0].get(1).map(String::as_str), Some("gwsync"));
        assert_eq!(
            calls.last().unwrap()[0],
            "procd_close_service",
            "calls: {calls:?}"
        );
        let mut service = Service::default();
        let mut open: Option<Instance> = None;
        for call in &calls[1..calls.len() - 1] {
            let (name, args) = (call[0].as_str(), &call[1..]);
            match name {
                "procd_open_instance" => {
                    assert!(open.is_none(), "nested procd_open_instance");
                    open = Some(Instance::default());
                }
                "procd_close_instance" => {
                    service
                        .instances
                        .push(open.take().expect("procd_close_instance without open"));
                }
                "procd_set_param" | "procd_append_param" => {
                    let inst = open
                        .as_mut()
                        .unwrap_or_else(|| panic!("{name} outside an instance"));
                    let values = inst.params.entry(args[0].clone()).or_default();
                    if name == "procd_set_param" {
                        values.clear();
                    }
                    values.extend(args[1..].iter().cloned());
                }
                n if n.starts_with("procd_add_") && n.ends_with("_trigger") => {
                    service.triggers.push(call.clone());
                }
                other => panic!("unexpected procd call {other} {args:?}"),
            }
        }
        assert!(open.is_none(), "instance left open");
        service
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The instance the init script should build: `args` follow
/// `gwsync daemon --foreground --syslog`.
fn daemon(args: &[&str], netdevs: &[&str], files: &[&str]) -> Instance {
    let mut command = strings(&[PROG, "daemon", "--foreground", "--syslog"]);
    command.extend(strings(args));
    let params = [
        ("command", command),
        ("respawn", vec![]),
        ("file", strings(files)),
        ("netdev", strings(netdevs)),
        ("stdout", strings(&["1"])),
        ("stderr", strings(&["1"])),
    ];
    Instance {
        params: params.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}

fn triggers(networks: &[&str]) -> Vec<Vec<String>> {
    let mut t = vec![strings(&["procd_add_reload_trigger", "gwsync"])];
    for net in networks {
        t.push(strings(&["procd_add_reload_interface_trigger", net]));
    }
    t
}

// ---------------------------------------------------------------- init script

/// What a section with no options starts once lan is up as br-lan.
fn default_service() -> Service {
    Service {
        instances: vec![daemon(
            &[
                "--interface",
                "br-lan",
                "--state-dir",
                "/etc/gwsync",
                "--socket",
                SOCKET,
                "--key-file",
                "/etc/gwsync.key",
            ],
            &["br-lan"],
            &["/etc/config/gwsync"],
        )],
        triggers: triggers(&["lan"]),
    }
}

#[test]
fn init_minimal_section_uses_every_default() {
    let Some(root) = Root::new("minimal") else {
        return;
    };
    // No options at all: enabled defaults to on, interface to lan, the key
    // file to /etc/gwsync.key.
    root.config("config gwsync 'main'\n");
    // The key file the package creates; the default when no key is set.
    root.write("/etc/gwsync.key", KEY);
    root.networks(&[("lan", "br-lan")]);
    root.init("start");
    assert_eq!(root.take_service(), default_service());
}

#[test]
fn init_two_interfaces_and_every_option() {
    let Some(root) = Root::new("two") else { return };
    root.config(
        "config gwsync 'main'\n\
         \toption enabled '1'\n\
         \tlist interface 'lan'\n\
         \tlist interface 'iot'\n\
         \toption group '239.255.1.2'\n\
         \toption port '7400'\n\
         \toption state_dir '/srv/gwsync'\n\
         \toption open '1'\n\
         \toption max_entries '500'\n\
         \toption max_store_bytes '65536'\n\
         \toption tombstone_lifetime_s '86400'\n\
         \toption log_level 'debug'\n",
    );
    root.networks(&[("lan", "br-lan"), ("iot", "br-iot")]);
    root.init("start");
    assert_eq!(
        root.take_service(),
        Service {
            instances: vec![daemon(
                &[
                    "--interface",
                    "br-lan",
                    "--interface",
                    "br-iot",
                    "--state-dir",
                    "/srv/gwsync",
                    "--socket",
                    SOCKET,
                    "--group",
                    "239.255.1.2",
                    "--port",
                    "7400",
                    "--open",
                    "--max-entries",
                    "500",
                    "--max-store-bytes",
                    "65536",
                    "--tombstone-lifetime-s",
                    "86400",
                    "--log-level",
                    "debug",
                ],
                &["br-lan", "br-iot"],
                &["/etc/config/gwsync"],
            )],
            triggers: triggers(&["lan", "iot"]),
        }
    );
}

#[test]
fn init_interface_given_as_option_is_accepted() {
    let Some(root) = Root::new("option-if") else {
        return;
    };
    root.config("config gwsync 'main'\n\toption interface 'iot'\n");
    root.networks(&[("lan", "br-lan"), ("iot", "br-iot")]);
    root.write("/etc/gwsync.key", KEY);
    root.init("start");
    let service = root.take_service();
    assert_eq!(service.instances.len(), 1);
    assert_eq!(service.instances[0].params["netdev"], strings(&["br-iot"]));
    assert_eq!(service.triggers, triggers(&["iot"]));
}

#[test]
fn init_key_file_is_passed_but_not_watched() {
    let Some(root) = Root::new("keyfile") else {
        return;
    };
    root.config(
        "config gwsync 'main'\n\
         \tlist interface 'lan'\n\
         \toption key_file '/etc/gwsync.key'\n",
    );
    root.networks(&[("lan", "br-lan")]);
    root.write("/etc/gwsync.key", KEY);
    root.init("start");
    // The key file is not among the files procd watches: a new key in it
    // is taken on reload with SIGHUP, not a restart (openwrt_real.rs proves
    // it).
    assert_eq!(root.take_service(), default_service());
    assert!(!root.path("/var/run/gwsync/key").exists());
}

const KEY: &str = "3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs=";

#[test]
fn init_key_file_wins_over_inline_key() {
    let Some(root) = Root::new("both") else {
        return;
    };
    root.write("/etc/gwsync.key", KEY);
    root.config(&format!(
        "config gwsync 'main'\n\toption key '{KEY}'\n\toption key_file '/etc/gwsync.key'\n"
    ));
    root.networks(&[("lan", "br-lan")]);
    root.init("start");
    let service = root.take_service();
    let command = &service.instances[0].params["command"];
    assert_eq!(
        command[command.len() - 2..],
        strings(&["--key-file", "/etc/gwsync.key"])
    );
    assert!(!root.path("/var/run/gwsync/key").exists());
    assert!(
        root.logs()
            .iter()
            .any(|l| l.contains("both key and key_file")),
        "logs: {:?}",
        root.logs()
    );
}

#[test]
fn init_open_with_a_key_syncs_with_the_key() {
    let Some(root) = Root::new("open-and-key") else {
        return;
    };
    root.write("/etc/gwsync.key", KEY);
    root.config("config gwsync 'main'\n\toption open '1'\n\toption key_file '/etc/gwsync.key'\n");
    root.networks(&[("lan", "br-lan")]);
    root.init("start");
    let command = &root.take_service().instances[0].params["command"];
    assert!(!command.contains(&"--open".to_owned()), "{command:?}");
    assert_eq!(
        command[command.len() - 2..],
        strings(&["--key-file", "/etc/gwsync.key"])
    );
    assert!(
        root.logs()
            .iter()
            .any(|l| l.contains("both open and a key")),
        "logs: {:?}",
        root.logs()
    );
}

#[test]
fn init_missing_key_file_starts_nothing_rather_than_syncing_in_clear() {
    let Some(root) = Root::new("nokeyfile") else {
        return;
    };
    root.config("config gwsync 'main'\n\toption key_file '/etc/gwsync.key'\n");
    root.networks(&[("lan", "br-lan")]);
    let out = root
        .command()
        .arg("ash")
        .arg(root.path("/etc/rc.common"))
        .arg(root.path("/etc/init.d/gwsync"))
        .arg("start")
        .output()
        .unwrap();
    assert!(out.status.success(), "rc.common start failed: {out:?}");
    assert!(root.take_service().instances.is_empty());
    assert!(
        root.logs()
            .iter()
            .any(|l| l.contains("key_file /etc/gwsync.key is not readable")),
        "logs: {:?}",
        root.logs()
    );
}

#[test]
fn init_disabled_config_starts_nothing_but_keeps_triggers() {
    let Some(root) = Root::new("disabled") else {
        return;
    };
    root.write("/var/run/gwsync/key", "old secret\n");
    root.config(
        "config gwsync 'main'\n\
         \toption enabled '0'\n\
         \tlist interface 'lan'\n\
         \tlist interface 'iot'\n",
    );
    root.networks(&[("lan", "br-lan"), ("iot", "br-iot")]);
    root.init("start");
    // Triggers stay so that enabling it in uci and running reload_config
    // starts the daemon.
    assert_eq!(
        root.take_service(),
        Service {
            instances: vec![],
            triggers: triggers(&["lan", "iot"]),
        }
    );
    assert!(!root.path("/var/run/gwsync/key").exists());
}

#[test]
fn init_network_without_device_is_skipped_until_it_comes_up() {
    let Some(root) = Root::new("nodev") else {
        return;
    };
    root.config("config gwsync 'main'\n\tlist interface 'lan'\n\tlist interface 'iot'\n");
    root.networks(&[("lan", "br-lan")]);
    root.write("/etc/gwsync.key", KEY);
    root.init("start");
    assert_eq!(
        root.take_service(),
        Service {
            instances: vec![daemon(
                &[
                    "--interface",
                    "br-lan",
                    "--state-dir",
                    "/etc/gwsync",
                    "--socket",
                    SOCKET,
                    "--key-file",
                    "/etc/gwsync.key",
                ],
                &["br-lan"],
                &["/etc/config/gwsync"],
            )],
            triggers: triggers(&["lan", "iot"]),
        }
    );
    assert!(
        root.logs().iter().any(|l| l.contains("'iot'")),
        "logs: {:?}",
        root.logs()
    );

    // iot comes up: its interface trigger runs reload, which now adds it.
    root.networks(&[("lan", "br-lan"), ("iot", "br-iot")]);
    root.init("reload");
    let service = root.take_service();
    assert_eq!(
        service.instances[0].params["netdev"],
        strings(&["br-lan", "br-iot"])
    );
}

#[test]
fn init_no_network_up_starts_nothing() {
    let Some(root) = Root::new("nonet") else {
        return;
    };
    root.config("config gwsync 'main'\n");
    root.networks(&[]);
    root.init("start");
    assert_eq!(
        root.take_service(),
        Service {
            instances: vec![],
            triggers: triggers(&["lan"]),
        }
    );
}

#[test]
fn init_a_network_up_before_procd_held_the_trigger_still_starts_the_daemon() {
    let Some(root) = Root::new("uprace") else {
        return;
    };
    root.config("config gwsync 'main'\n");
    root.write("/etc/gwsync.key", KEY);
    root.networks(&[]);
    // netifd brings lan up after start_service looked and before procd
    // held the interface trigger: no trigger fires for it.
    root.write(
        "/.fixture/on_close_service",
        "printf 'lan br-lan\\n' > \"$IPKG_INSTROOT/.fixture/network\"\n",
    );
    root.init("start");
    let services = root.take_services();
    assert_eq!(services.len(), 2, "services sent to procd: {services:?}");
    assert_eq!(services[0].instances, vec![]);
    assert_eq!(services[1], default_service());
    assert!(
        root.logs()
            .iter()
            .any(|l| l.contains("'lan' came up while starting")),
        "logs: {:?}",
        root.logs()
    );
}

#[test]
fn init_without_main_section_starts_nothing() {
    let Some(root) = Root::new("anon") else {
        return;
    };
    root.config("config gwsync\n\toption enabled '1'\n");
    root.networks(&[("lan", "br-lan")]);
    root.init("start");
    assert!(root.take_service().instances.is_empty());
    assert!(
        root.logs()
            .iter()
            .any(|l| l.contains("no 'config gwsync main' section")),
        "logs: {:?}",
        root.logs()
    );
}

#[test]
fn init_script_declares_procd_and_start_order() {
    let text = read(&repo().join("init.d/gwsync"));
    assert!(text.starts_with("#!/bin/sh /etc/rc.common\n"));
    let has = |line: &str| text.lines().any(|l| l == line);
    assert!(has("USE_PROCD=1"));
    // After netifd (20): interfaces may still be down, the triggers cover it.
    assert!(has("START=95"));
    assert!(has("STOP=10"));
}

// ---------------------------------------------------------------- hotplug

const TRIGGER: [&str; 5] = ["gwsync", "--socket", SOCKET, "trigger", "network-up"];

/// Waits for the backgrounded trigger to be recorded.
fn wait_for_trigger(root: &Root, timeout: Duration) -> Vec<Vec<String>> {
    let start = Instant::now();
    loop {
        let calls = root.gwsync_calls();
        if !calls.is_empty() || start.elapsed() > timeout {
            return calls;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The script logs before it spawns the trigger, so no log line means no
/// trigger; the short wait also catches a trigger spawned without logging.
fn assert_no_trigger(root: &Root) {
    thread::sleep(Duration::from_millis(300));
    assert_eq!(root.gwsync_calls(), Vec::<Vec<String>>::new());
    assert_eq!(root.logs(), Vec::<String>::new());
}

fn hotplug_root(test: &str, config: &str) -> Option<(Root, UnixListener)> {
    let root = Root::new(test)?;
    root.config(config);
    let socket = root.daemon_socket();
    Some((root, socket))
}

const TWO_NETWORKS: &str = "config gwsync 'main'\n\tlist interface 'lan'\n\tlist interface 'iot'\n";

#[test]
fn hotplug_ifupdate_and_second_network_trigger_sync() {
    let Some((root, _socket)) = hotplug_root("ifupdate", TWO_NETWORKS) else {
        return;
    };
    root.hotplug(&[
        ("ACTION", "ifupdate"),
        ("INTERFACE", "iot"),
        ("IFUPDATE_ADDRESSES", "1"),
    ]);
    assert_eq!(
        wait_for_trigger(&root, Duration::from_secs(10)),
        vec![strings(&TRIGGER)]
    );
}

#[test]
fn hotplug_default_interface_is_lan() {
    let Some((root, _socket)) = hotplug_root("default", "config gwsync 'main'\n") else {
        return;
    };
    root.hotplug(&[("ACTION", "ifup"), ("INTERFACE", "lan")]);
    assert_eq!(
        wait_for_trigger(&root, Duration::from_secs(10)),
        vec![strings(&TRIGGER)]
    );
}

#[test]
fn hotplug_ignores_other_networks() {
    let Some((root, _socket)) = hotplug_root("other", TWO_NETWORKS) else {
        return;
    };
    root.hotplug(&[("ACTION", "ifup"), ("INTERFACE", "wan"), ("DEVICE", "eth1")]);
    // A prefix of a configured name is another network.
    root.hotplug(&[("ACTION", "ifup"), ("INTERFACE", "la")]);
    assert_no_trigger(&root);
}

#[test]
fn hotplug_ignores_ifdown_and_other_actions() {
    let Some((root, _socket)) = hotplug_root("ifdown", TWO_NETWORKS) else {
        return;
    };
    for action in ["ifdown", "ifup-failed", ""] {
        root.hotplug(&[("ACTION", action), ("INTERFACE", "lan")]);
    }
    assert_no_trigger(&root);
}

#[test]
fn hotplug_does_nothing_when_disabled() {
    let Some((root, _socket)) = hotplug_root(
        "hp-disabled",
        "config gwsync 'main'\n\toption enabled '0'\n",
    ) else {
        return;
    };
    root.hotplug(&[("ACTION", "ifup"), ("INTERFACE", "lan")]);
    assert_no_trigger(&root);
}

#[test]
fn hotplug_does_nothing_when_daemon_is_not_running() {
    let Some(root) = Root::new("hp-nosock") else {
        return;
    };
    root.config(TWO_NETWORKS);
    root.hotplug(&[("ACTION", "ifup"), ("INTERFACE", "lan")]);
    assert_no_trigger(&root);
}

#[test]
fn hotplug_returns_before_the_trigger_finishes() {
    let Some(root) = Root::new("hp-async") else {
        return;
    };
    root.config(TWO_NETWORKS);
    let _socket = root.daemon_socket();
    // The stub trigger takes 3 s; netifd's event queue must not wait for it.
    let took = root.hotplug(&[
        ("GWSYNC_STUB_SLEEP", "3"),
        ("ACTION", "ifup"),
        ("INTERFACE", "lan"),
    ]);
    assert!(
        took < Duration::from_secs(2),
        "hotplug script blocked for {took:?}"
    );
    assert_eq!(root.gwsync_calls(), Vec::<Vec<String>>::new());
    assert_eq!(
        wait_for_trigger(&root, Duration::from_secs(15)),
        vec![strings(&TRIGGER)]
    );
}

// ---------------------------------------------------------------- shell style

const SCRIPTS: [&str; 4] = [
    "init.d/gwsync",
    "openwrt/gwsync/files/gwsync.hotplug",
    "openwrt/gwsync/files/gwsync.defaults",
    "openwrt/gwsync/test.sh",
];

#[test]
fn scripts_pass_shfmt_as_the_feed_ci_runs_it() {
    let Some(shfmt) = tool("shfmt") else { return };
    for script in SCRIPTS {
        let out = Command::new(&shfmt)
            .args(["-sr", "-s", "-d"])
            .arg(repo().join(script))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "shfmt -sr -s -d {script}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn scripts_pass_shellcheck() {
    let Some(shellcheck) = tool("shellcheck") else {
        return;
    };
    for script in SCRIPTS {
        let out = Command::new(&shellcheck)
            .arg(repo().join(script))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "shellcheck {script}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn busybox_ash_parses_the_scripts() {
    let Some(busybox) = tool("busybox") else {
        return;
    };
    for script in SCRIPTS {
        let out = Command::new(&busybox)
            .args(["ash", "-n"])
            .arg(repo().join(script))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "busybox ash -n {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------- config file

#[test]
fn shipped_config_shows_every_option_the_scripts_read() {
    let config = read(&repo().join("openwrt/gwsync/files/gwsync.config"));
    let init = read(&repo().join("init.d/gwsync"));
    assert!(config.lines().any(|l| l == "config gwsync 'main'"));
    for option in [
        "enabled",
        "interface",
        "group",
        "port",
        "key",
        "key_file",
        "state_dir",
        "log_level",
    ] {
        let shown = config.lines().any(|l| {
            let l = l.trim_start().trim_start_matches('#');
            l.starts_with(&format!("option {option} ")) || l.starts_with(&format!("list {option} "))
        });
        assert!(shown, "option {option} is not shown in gwsync.config");
        assert!(
            init.contains(&format!("\"$SECTION\" {option}")),
            "init.d/gwsync does not read option {option}"
        );
    }
}

// ---------------------------------------------------------------- Makefile

fn makefile() -> String {
    read(&repo().join("openwrt/gwsync/Makefile"))
}

/// The value of `NAME:=value` at the start of a line.
fn make_var(text: &str, name: &str) -> Option<String> {
    let prefix = format!("{name}:=");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_owned())
}

fn cargo_package_field(field: &str) -> String {
    let cargo = read(&repo().join("Cargo.toml"));
    let mut in_package = false;
    for line in cargo.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == field {
                    return v.trim().trim_matches('"').to_owned();
                }
            }
        }
    }
    panic!("no {field} in Cargo.toml [package]");
}

/// The body of `define NAME` ... `endef`.
fn define_block<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let header = format!("define {name}");
    let mut lines = text.lines().skip_while(|l| l.trim_end() != header);
    assert!(
        lines.next().is_some(),
        "no `{header}` in openwrt/gwsync/Makefile"
    );
    lines.take_while(|l| l.trim() != "endef").collect()
}

#[test]
fn makefile_has_the_package_variables_the_feed_needs() {
    let mk = makefile();
    let var = |name: &str| make_var(&mk, name).unwrap_or_else(|| panic!("{name}:= missing"));
    assert_eq!(var("PKG_NAME"), "gwsync");
    let version = var("PKG_VERSION");
    assert_eq!(
        version,
        cargo_package_field("version"),
        "PKG_VERSION != Cargo.toml"
    );
    // apk: <major>.<minor>.<fix>[.<n>...] and an integer release.
    let parts: Vec<&str> = version.split('.').collect();
    assert!(
        parts.len() >= 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        "PKG_VERSION {version} is not apk-compatible"
    );
    let release = var("PKG_RELEASE");
    assert!(
        release.parse::<u32>().map(|r| r >= 1).unwrap_or(false),
        "PKG_RELEASE {release}"
    );
    assert_eq!(var("PKG_LICENSE"), cargo_package_field("license"));
    let maintainer = var("PKG_MAINTAINER");
    assert!(
        maintainer.contains(" <") && maintainer.ends_with('>') && maintainer.contains('@'),
        "PKG_MAINTAINER must be `Name <email>`: {maintainer}"
    );
    assert_eq!(var("PKG_BUILD_DEPENDS"), "rust/host");
    assert_eq!(var("PKG_BUILD_PARALLEL"), "1");
}

#[test]
fn makefile_includes_in_the_order_the_sdk_needs() {
    let mk = makefile();
    let pos = |needle: &str| {
        mk.lines()
            .position(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no line starting with `{needle}`"))
    };
    let rules = pos("include $(TOPDIR)/rules.mk");
    let name = pos("PKG_NAME:=");
    let release = pos("PKG_RELEASE:=");
    let package = pos("include $(INCLUDE_DIR)/package.mk");
    let rust = mk
        .lines()
        .position(|l| l.starts_with("include ") && l.contains("../../lang/rust/rust-package.mk"))
        .expect("no include of ../../lang/rust/rust-package.mk");
    assert!(rules < name && name < release && release < package && package < rust);
    // Variables read by package.mk when it is included must come before it.
    for var in [
        "PKG_BUILD_DEPENDS:=",
        "PKG_BUILD_PARALLEL:=",
        "PKG_MAINTAINER:=",
    ] {
        assert!(pos(var) < package, "{var} after package.mk");
    }
}

#[test]
fn makefile_defines_the_package_with_literal_names() {
    let mk = makefile();
    let meta = define_block(&mk, "Package/gwsync");
    assert!(
        meta.contains(&"  DEPENDS:=$(RUST_ARCH_DEPENDS)"),
        "{meta:?}"
    );
    for line in &meta {
        assert!(
            line.starts_with("  ") && !line.starts_with("   "),
            "metadata indent: {line:?}"
        );
    }
    let tail: Vec<&str> = mk
        .lines()
        .filter(|l| !l.trim().is_empty())
        .rev()
        .take(2)
        .collect();
    assert_eq!(
        tail,
        vec![
            "$(eval $(call BuildPackage,gwsync))",
            "$(eval $(call RustBinPackage,gwsync))"
        ]
    );
    for line in mk.lines() {
        let t = line.trim_start();
        if t.starts_with("define ") || t.starts_with("$(eval") || t.contains("$(call ") {
            assert!(
                !line.contains("$(PKG_NAME)"),
                "use the literal name: {line}"
            );
        }
    }
}

#[test]
fn makefile_conffiles_are_not_indented() {
    let mk = makefile();
    let conffiles = define_block(&mk, "Package/gwsync/conffiles");
    assert!(conffiles.contains(&"/etc/config/gwsync"), "{conffiles:?}");
    for line in conffiles {
        assert!(
            line.starts_with('/'),
            "conffiles line must be an absolute path: {line:?}"
        );
    }
}

#[test]
fn makefile_recipes_are_tab_indented() {
    let mk = makefile();
    for name in [
        "Build/Compile",
        "Build/InstallDev",
        "Build/Prepare",
        "Package/gwsync/install",
    ] {
        let body = define_block(&mk, name);
        assert!(!body.is_empty(), "{name} is empty");
        for line in body {
            assert!(
                line.starts_with('\t'),
                "{name}: recipe line not tab-indented: {line:?}"
            );
        }
    }
    assert!(!mk.contains('\r'), "CRLF in openwrt/gwsync/Makefile");
}

#[test]
fn makefile_builds_and_stages_the_static_library() {
    let mk = makefile();
    let compile = define_block(&mk, "Build/Compile").join("\n");
    assert!(compile.contains("$(call Build/Compile/Cargo"), "{compile}");
    assert!(compile.contains("+$(CARGO_PKG_VARS)"), "{compile}");
    assert!(compile.contains("cargo build -v --lib"), "{compile}");
    assert!(
        compile.contains("--profile $(CARGO_PKG_PROFILE)"),
        "{compile}"
    );
    let dev = define_block(&mk, "Build/InstallDev").join("\n");
    for staged in ["include/gwsync.h", "libgwsync.a", "pkgconfig/gwsync.pc"] {
        assert!(
            dev.contains(staged),
            "Build/InstallDev does not stage {staged}"
        );
    }
    let install = define_block(&mk, "Package/gwsync/install").join("\n");
    for installed in [
        "$(1)/usr/sbin/",
        "$(1)/etc/init.d/gwsync",
        "$(1)/etc/config/gwsync",
        "$(1)/etc/hotplug.d/iface/95-gwsync",
    ] {
        assert!(
            install.contains(installed),
            "install step lacks {installed}"
        );
    }
    assert!(mk.contains("--remap-path-prefix=$(PKG_BUILD_DIR)="));
}

#[test]
fn pkg_config_template_is_relocatable() {
    let pc = read(&repo().join("openwrt/gwsync/files/gwsync.pc.in"));
    let field = |name: &str| {
        pc.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} missing in gwsync.pc.in"))
            .to_owned()
    };
    // OpenWrt's pkg-config wrapper only redefines prefix.
    assert_eq!(field("prefix="), "/usr");
    assert!(field("libdir=").starts_with("${"));
    assert!(field("includedir=").starts_with("${"));
    assert_eq!(field("Version: "), "@VERSION@");
    assert!(field("Libs: ").contains("-lgwsync @NATIVE_LIBS@"));
}

// ------------------------------------------------- Makefile recipes under make

/// Minimal stand-ins for the SDK's make includes: just enough for
/// openwrt/gwsync/Makefile to expand, with every recipe exposed as a target.
const FAKE_RULES_MK: &str = "\
INCLUDE_DIR:=$(TOPDIR)/include
INSTALL_DIR:=install -d -m0755
INSTALL_BIN:=install -m0755
INSTALL_DATA:=install -m0644
INSTALL_CONF:=install -m0600
CP:=cp -fpR
SED:=sed -i -e
";

const FAKE_PACKAGE_MK: &str = "\
PKG_BUILD_DIR?=$(BUILD_DIR)/$(PKG_NAME)-$(PKG_VERSION)
PKG_INSTALL_DIR?=$(PKG_BUILD_DIR)/ipkg-install
";

const FAKE_RUST_PACKAGE_MK: &str = "\
RUSTC_TARGET_ARCH:=mipsel-unknown-linux-musl
RUST_ARCH_DEPENDS:=@(mipsel)
CARGO_HOME:=/sdk/dl/cargo
CARGO_RUSTFLAGS+=-Ctarget-feature=-crt-static
CARGO_PKG_VARS=CARGO_BUILD_TARGET=$(RUSTC_TARGET_ARCH) RUSTFLAGS=\"$(CARGO_RUSTFLAGS)\"
CARGO_PKG_PROFILE:=release
CARGO_PKG_ARGS=--locked
define Build/Compile/Cargo
\t+$(CARGO_PKG_VARS) cargo install -v --profile $(CARGO_PKG_PROFILE) $(if $(strip $(RUST_PKG_FEATURES)),--features \"$(strip $(RUST_PKG_FEATURES))\") --root $(PKG_INSTALL_DIR) --path \"$(PKG_BUILD_DIR)/$(if $(strip $(1)),$(strip $(1)),.)\" $(if $(filter --jobserver%,$(PKG_JOBS)),,-j1) $(CARGO_PKG_ARGS) $(2)
endef
define RustBinPackage
endef
define BuildPackage
prepare:
\t$$(Build/Prepare)
compile:
\t$$(Build/Compile)
install:
\t$$(call Package/$(1)/install,$$(DESTDIR))
installdev:
\t$$(call Build/InstallDev,$$(STAGING))
endef
";

fn run_make(mk_dir: &Path, topdir: &Path, vars: &[String], target: &str) -> Output {
    let make = tool("make").expect("checked by caller");
    // A stub cargo in <tmp>/bin, when the test made one, comes first.
    let path = format!(
        "{}:{}",
        topdir.parent().unwrap().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(make)
        .env("PATH", path)
        .arg("--no-print-directory")
        .arg("-C")
        .arg(mk_dir)
        .arg(format!("TOPDIR={}", topdir.display()))
        .args(vars)
        .arg(target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make {target} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn makefile_recipes_install_and_stage_the_right_files() {
    if tool("make").is_none() {
        return;
    }
    let scratch = common::TempDir::new("openwrt-make");
    let dir = scratch.path().to_owned();
    let topdir = dir.join("sdk");
    for (path, text) in [
        ("rules.mk", FAKE_RULES_MK),
        ("include/package.mk", FAKE_PACKAGE_MK),
        (
            "feeds/packages/lang/rust/rust-package.mk",
            FAKE_RUST_PACKAGE_MK,
        ),
    ] {
        let p = topdir.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    let build = dir.join("build/gwsync-0.1.0");
    let (dest, staging) = (dir.join("ipkg"), dir.join("staging"));
    let vars = vec![
        format!("BUILD_DIR={}", dir.join("build").display()),
        format!("DESTDIR={}", dest.display()),
        format!("STAGING={}", staging.display()),
    ];
    let mk_dir = repo().join("openwrt/gwsync");

    // Prepare copies the crate (not target/) into the build directory.
    run_make(&mk_dir, &topdir, &vars, "prepare");
    for f in [
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "init.d/gwsync",
        "openwrt/gwsync/Makefile",
    ] {
        assert!(build.join(f).exists(), "prepare did not copy {f}");
    }
    assert!(!build.join("target").exists(), "prepare copied target/");

    // Compile: two cargo runs with the same environment, profile, features
    // and target directory; only the binary's aborts on a panic. A stub cargo
    // on PATH records them (make -n would still run the `+` lines).
    let stub_bin = dir.join("bin");
    fs::create_dir_all(&stub_bin).unwrap();
    let cargo_log = dir.join("cargo.log");
    fs::write(
        stub_bin.join("cargo"),
        format!(
            "#!/bin/sh\nprintf 'CARGO_BUILD_TARGET=%s RUSTFLAGS=%s cargo %s\\n' \
             \"$CARGO_BUILD_TARGET\" \"$RUSTFLAGS\" \"$*\" >> '{}'\n",
            cargo_log.display()
        ),
    )
    .unwrap();
    fs::set_permissions(stub_bin.join("cargo"), fs::Permissions::from_mode(0o755)).unwrap();
    run_make(&mk_dir, &topdir, &vars, "compile");
    let text = read(&cargo_log);
    let cargo_lines: Vec<&str> = text.lines().collect();
    assert_eq!(cargo_lines.len(), 2, "{text}");
    let target_dir = format!("--target-dir {}/target", build.display());
    for line in &cargo_lines {
        assert!(
            line.contains("CARGO_BUILD_TARGET=mipsel-unknown-linux-musl"),
            "{line}"
        );
        assert!(line.contains("--profile release"), "{line}");
        assert!(line.contains(&target_dir), "{line}");
        assert!(line.contains("-j1"), "{line}");
        assert!(line.contains("--locked"), "{line}");
        assert!(
            line.contains(&format!(
                "--remap-path-prefix={}=/build/gwsync",
                build.display()
            )),
            "{line}"
        );
        assert!(line.contains("-Ctarget-feature=-crt-static"), "{line}");
        // No `gwsync demo` on a router.
        assert!(line.contains("--no-default-features"), "{line}");
        assert!(line.contains("--features ubus"), "{line}");
    }
    assert!(
        cargo_lines[0].contains("cargo install"),
        "{}",
        cargo_lines[0]
    );
    assert!(
        cargo_lines[0].contains("--config profile.release.panic=\"abort\""),
        "{}",
        cargo_lines[0]
    );
    assert!(
        cargo_lines[1].contains("cargo build -v --lib"),
        "{}",
        cargo_lines[1]
    );
    // The library keeps unwinding, for GWSYNC_ERR_PANIC.
    assert!(!cargo_lines[1].contains("panic"), "{}", cargo_lines[1]);

    // Install and InstallDev against stand-in build outputs.
    let lib_dir = build.join("target/mipsel-unknown-linux-musl/release");
    fs::create_dir_all(&lib_dir).unwrap();
    fs::write(lib_dir.join("libgwsync.a"), "!<arch>\n").unwrap();
    fs::create_dir_all(build.join("ipkg-install/bin")).unwrap();
    fs::write(build.join("ipkg-install/bin/gwsync"), "binary").unwrap();
    fs::create_dir_all(build.join("include")).unwrap();
    fs::write(build.join("include/gwsync.h"), "/* header */").unwrap();
    run_make(&mk_dir, &topdir, &vars, "install");
    run_make(&mk_dir, &topdir, &vars, "installdev");

    let mode = |p: &Path| {
        fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&dest.join("usr/sbin/gwsync")), 0o755);
    assert_eq!(mode(&dest.join("etc/init.d/gwsync")), 0o755);
    assert_eq!(
        read(&dest.join("etc/init.d/gwsync")),
        read(&repo().join("init.d/gwsync"))
    );
    // 0600: the config may hold the group key.
    assert_eq!(mode(&dest.join("etc/config/gwsync")), 0o600);
    assert_eq!(
        read(&dest.join("etc/config/gwsync")),
        read(&repo().join("openwrt/gwsync/files/gwsync.config"))
    );
    assert_eq!(
        read(&dest.join("etc/hotplug.d/iface/95-gwsync")),
        read(&repo().join("openwrt/gwsync/files/gwsync.hotplug"))
    );

    assert!(staging.join("usr/include/gwsync.h").is_file());
    assert!(staging.join("usr/lib/libgwsync.a").is_file());
    let pc = read(&staging.join("usr/lib/pkgconfig/gwsync.pc"));
    assert!(pc.lines().any(|l| l == "Version: 0.1.0"), "{pc}");
    assert!(
        pc.lines()
            .any(|l| l == "Libs: -L${libdir} -lgwsync -lgcc_s -lc"),
        "{pc}"
    );
    assert!(!pc.contains('@'), "unsubstituted placeholder in {pc}");

    // pkg-config, pointed at the staging directory the way OpenWrt's wrapper
    // does it, gives flags inside staging.
    if let Some(pkg_config) = tool("pkg-config") {
        let out = Command::new(pkg_config)
            .env("PKG_CONFIG_LIBDIR", staging.join("usr/lib/pkgconfig"))
            .arg(format!(
                "--define-variable=prefix={}/usr",
                staging.display()
            ))
            .args(["--cflags", "--libs", "gwsync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let flags = String::from_utf8_lossy(&out.stdout);
        assert!(
            flags.contains(&format!("-I{}/usr/include", staging.display())),
            "{flags}"
        );
        assert!(
            flags.contains(&format!("-L{}/usr/lib", staging.display())),
            "{flags}"
        );
    }
}
