//! luci-app-gwsync in a real browser: OpenWrt 24.10's LuCI (uhttpd, rpcd,
//! ucode, luci-base) on a router booted with procd in namespaces, the app's
//! files installed as luci.mk installs them, the gwsync package running, a
//! second gateway on the same bridge, and headless Chromium driven over the
//! DevTools protocol by tests/luci/cdp.mjs.
//!
//! The screenshots stay in `target/luci-shots/` after the run.

mod common;

use common::owrt::{self, Bridge, Flavor, Router};
use common::{TempDir, skip, wait_until};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

const BASE: &str = "http://127.0.0.1:8080";
const ROOT_PASSWORD: &str = "luci-test";
const VIEWER: &str = "viewer";
const VIEWER_PASSWORD: &str = "viewer-test";
const PAGE: &str = "/cgi-bin/luci/admin/services/gwsync";

fn app_dir() -> PathBuf {
    owrt::repo().join("openwrt/luci-app-gwsync")
}

fn shots_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("luci-shots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Copies the app's files where luci.mk's Package/install puts them:
/// htdocs/ under /www, root/ under /. Its postinst (clear LuCI's caches,
/// reload rpcd) has nothing to do before the router's first boot.
fn install_luci_app(router: &Router) {
    for (from, to) in [("htdocs", "/www"), ("root", "/")] {
        let source = app_dir().join(from);
        let dest = router.path(to);
        std::fs::create_dir_all(&dest).unwrap();
        let status = Command::new("cp")
            .args(["-pR", &format!("{}/.", source.display())])
            .arg(&dest)
            .status()
            .unwrap();
        assert!(status.success(), "install {from} of luci-app-gwsync");
    }
}

/// uhttpd on 127.0.0.1:8080 with LuCI's ucode handler (as
/// ../shared/openwrt-luci/run.sh sets it up), root's password, and a second
/// rpcd login that holds only read grants.
fn configure_luci(router: &Router) {
    let hash = |password: &str| {
        let output = Command::new("openssl")
            .args(["passwd", "-6", password])
            .output()
            .expect("openssl passwd");
        assert!(output.status.success(), "openssl passwd");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let shadow_path = router.path("/etc/shadow");
    let shadow = std::fs::read_to_string(&shadow_path).unwrap();
    let root_hash = hash(ROOT_PASSWORD);
    let shadow: String = shadow
        .lines()
        .map(|line| match line.strip_prefix("root:") {
            Some(rest) => format!("root:{root_hash}:{}\n", rest.split_once(':').unwrap().1),
            None => format!("{line}\n"),
        })
        .collect();
    std::fs::write(&shadow_path, shadow).unwrap();
    let viewer_hash = hash(VIEWER_PASSWORD);
    let result = router.chroot(&format!(
        "uci -q delete uhttpd.main.listen_http; uci -q delete uhttpd.main.listen_https; \
         uci -q delete uhttpd.main.lua_prefix; \
         uci add_list uhttpd.main.listen_http=127.0.0.1:8080; \
         uci add_list uhttpd.main.ucode_prefix='/cgi-bin/luci=/usr/share/ucode/luci/uhttpd.uc'; \
         uci set uhttpd.main.rfc1918_filter=0; uci commit uhttpd; \
         uci add rpcd login >/dev/null; \
         uci set rpcd.@login[-1].username={VIEWER}; \
         uci set rpcd.@login[-1].password='{viewer_hash}'; \
         for group in unauthenticated luci-base luci-app-gwsync; do \
           uci add_list rpcd.@login[-1].read=$group; done; \
         uci commit rpcd; \
         for s in rpcd uhttpd; do /etc/init.d/$s enable || exit 1; done"
    ));
    assert_eq!(result.code, 0, "configure uhttpd and rpcd: {result:?}");
}

/// The router's group key, in the file uci's key_file names.
fn give_key(router: &Router, key: &str) {
    router.write("/etc/gwsync.key", key);
    std::fs::set_permissions(
        router.path("/etc/gwsync.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let result = router.chroot("uci set gwsync.main.key_file=/etc/gwsync.key && uci commit gwsync");
    assert_eq!(result.code, 0, "uci key_file: {result:?}");
}

/// Headless Chromium in the router's network (and pid) namespace, driven
/// by tests/luci/cdp.mjs, which starts it; both end on drop (and Chromium
/// at the latest with the router's PID 1).
struct Browser {
    driver: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    _profile: TempDir,
}

impl Browser {
    fn start(router: &Router) -> Browser {
        let profile = TempDir::new("chromium");
        let mut driver = Command::new("node")
            .arg(owrt::repo().join("tests/luci/cdp.mjs"))
            .args(["nsenter", "-t", &router.pid().to_string(), "-n", "-p"])
            .args([
                "chromium",
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
            ])
            .args(["--disable-dev-shm-usage", "--no-first-run"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--window-size=1280,900")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(shots_dir().join("chromium.log")).unwrap())
            .spawn()
            .expect("start node tests/luci/cdp.mjs");
        let stdin = driver.stdin.take();
        let stdout = BufReader::new(driver.stdout.take().unwrap());
        Browser {
            driver,
            stdin,
            stdout,
            _profile: profile,
        }
    }

    /// One command to cdp.mjs; its value, or what went wrong.
    fn call(&mut self, command: Value) -> Result<Value, String> {
        let stdin = self.stdin.as_mut().ok_or("cdp.mjs: stdin closed")?;
        writeln!(stdin, "{command}").map_err(|error| format!("cdp.mjs: {error}"))?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|error| format!("cdp.mjs: {error}"))?;
        let answer: Value = serde_json::from_str(&line)
            .map_err(|error| format!("cdp.mjs answered {line:?}: {error}"))?;
        if answer["ok"] == true {
            Ok(answer["value"].clone())
        } else {
            Err(answer["error"].as_str().unwrap_or("no answer").to_owned())
        }
    }

    fn ok(&mut self, command: Value) -> Value {
        let what = command.to_string();
        self.call(command)
            .unwrap_or_else(|error| panic!("browser: {what}: {error}"))
    }

    fn login(&mut self, user: &str, password: &str) {
        self.ok(json!({"op": "login", "base": BASE, "user": user, "password": password}));
    }

    /// Opens a page of the app and waits until `ready` (a JS expression) holds.
    fn open(&mut self, page: &str, ready: &str) -> Value {
        self.ok(json!({"op": "goto", "url": format!("{BASE}{PAGE}/{page}"), "ready": ready}))
    }

    fn wait(&mut self, expr: &str) -> Value {
        self.ok(json!({"op": "wait", "expr": expr, "ms": 30_000}))
    }

    fn eval(&mut self, expr: &str) -> Value {
        self.ok(json!({"op": "eval", "expr": expr}))
    }

    fn click(&mut self, selector: &str) {
        self.ok(json!({"op": "click", "selector": selector}));
    }

    fn type_text(&mut self, selector: &str, text: &str) {
        self.ok(json!({"op": "type", "selector": selector, "text": text}));
    }

    fn shot(&mut self, name: &str) -> PathBuf {
        let path = shots_dir().join(format!("{name}.png"));
        self.ok(json!({"op": "shot", "path": path}));
        path
    }

    /// Uncaught exceptions in the pages since the last call; LuCI's own
    /// 403 for the login form is not one.
    fn exceptions(&mut self) -> Vec<String> {
        let problems = self.ok(json!({"op": "problems"}));
        problems
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .filter(|problem| problem.starts_with("exception"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the page showed when the test failed, for the artifacts.
            let path = shots_dir().join("failure.png");
            if self.call(json!({"op": "shot", "path": path})).is_ok() {
                eprintln!("screenshot of the failure: {}", path.display());
            }
        }
        // End of stdin: cdp.mjs closes Chromium and exits; if it hangs, it
        // is killed (Chromium then ends with the router's PID 1).
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(self.driver.try_wait(), Ok(None)) {
            if std::time::Instant::now() >= deadline {
                let _ = self.driver.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.driver.wait();
    }
}

/// A JSON-RPC call to rpcd through uhttpd's /ubus from inside the page, with
/// the page's own session: what LuCI's rpc.js does, without its error
/// handling, so the test sees rpcd's answer as it is.
fn ubus_from_page(object: &str, method: &str, args: Value) -> String {
    format!(
        "fetch('/ubus', {{method: 'POST', body: JSON.stringify({{jsonrpc: '2.0', id: 1, \
         method: 'call', params: [L.env.sessionid, {object:?}, {method:?}, {args}]}})}}) \
         .then(r => r.json())"
    )
}

fn gwsync_get(router: &Router, key: &str) -> Option<String> {
    let result = router.sh(&format!("gwsync get '{key}'"));
    (result.code == 0).then(|| result.stdout.trim().to_owned())
}

/// The daemon's pid and command line as procd reports them.
fn service(router: &Router) -> (u64, Vec<String>) {
    let text = router.sh_ok("ubus call service list '{\"name\":\"gwsync\"}'");
    let list: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let instance = &list["gwsync"]["instances"]["instance1"];
    let command = instance["command"]
        .as_array()
        .map(|words| {
            words
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    (instance["pid"].as_u64().unwrap_or(0), command)
}

/// The text of the peer's row on the open status page, once it is there
/// (and shows the peer in sync, if `in_sync`). Two gateways in sync may
/// leave the talking to one of them (Trickle suppresses a summary when it
/// has heard a consistent one), so the peer is triggered, again after each
/// while, until the page shows it.
fn peer_row(browser: &mut Browser, peer: &Router, peer_id: &str, in_sync: bool) -> Value {
    let row = format!(
        "[...document.querySelectorAll('#gwsync-peers .tr')].find(r => r.innerText.includes('{peer_id}') \
         && ({} || !!r.querySelector('.label.success')))?.innerText",
        !in_sync
    );
    for _ in 0..5 {
        peer.sh_ok("gwsync trigger");
        if let Ok(text) = browser.call(json!({"op": "wait", "expr": row, "ms": 6_000})) {
            return text;
        }
    }
    browser.wait(&row)
}

#[test]
fn luci_app_in_chromium() {
    const TEST: &str = "luci_app_in_chromium";
    if !common::runner_argv().is_empty() {
        common::skip_on_emulator(&format!(
            "{TEST}: the OpenWrt userland and Chromium are x86_64 host programs"
        ));
        return;
    }
    if !have("chromium") || !have("node") || !have("openssl") {
        skip(&format!(
            "{TEST}: needs chromium, nodejs and openssl (apt-get install chromium nodejs openssl)"
        ));
        return;
    }
    let Some(mut gateway) = Router::new(TEST, Flavor::Luci) else {
        return;
    };
    let Some(mut peer) = Router::new(&format!("{TEST}-peer"), Flavor::Base) else {
        return;
    };
    let key = common::gwsync(&["genkey"]);
    assert_eq!(key.code, 0, "genkey: {key:?}");
    for router in [&gateway, &peer] {
        router.install_package();
        give_key(router, &key.stdout);
    }
    install_luci_app(&gateway);
    for router in [&gateway, &peer] {
        router.enable_installed();
    }
    // After the uci-defaults (LuCI's among them), as on a first boot.
    configure_luci(&gateway);
    let bridge = Bridge::new();
    gateway.boot(bridge.port(0));
    peer.boot(bridge.port(1));
    for router in [&gateway, &peer] {
        router.wait_lan_up();
    }
    gateway.wait_for(
        "gwsync answers on ubus",
        Duration::from_secs(20),
        "ubus call gwsync status",
    );
    peer.wait_for("gwsync runs", Duration::from_secs(20), "gwsync status");
    let peer_status: Value = serde_json::from_str(&peer.sh_ok("gwsync status --json")).unwrap();
    let peer_id = peer_status["node_id"].as_str().unwrap().to_owned();

    let mut browser = Browser::start(&gateway);
    browser.login("root", ROOT_PASSWORD);
    let menu = browser.eval(
        "[...document.querySelectorAll('a')].filter(a => /admin\\/services\\/gwsync$/.test(a.href)).map(a => a.textContent.trim())",
    );
    assert_eq!(menu, json!(["Gateway sync"]), "Services menu entry");

    // Status: the peer is listed, keyed, with when it was last heard.
    browser.open("status", "!!document.querySelector('#gwsync-node-id')");
    let row = peer_row(&mut browser, &peer, &peer_id, false);
    assert!(
        row.as_str().unwrap().contains("ago") || row.as_str().unwrap().contains("just now"),
        "peer row without last heard: {row}"
    );
    let key_state = browser.eval("document.querySelector('#gwsync-key-state').dataset.state");
    assert_eq!(key_state, "keyed", "key state on the status page");

    // Data: keys written on the peer by CLI appear, paged by 25.
    let scene = r#"{"name":"Evening","lights":[{"id":"l1","on":true,"level":40}]}"#;
    peer.sh_ok(&format!("gwsync set home/1/scene/evening '{scene}'"));
    peer.sh_ok(
        "for i in $(seq 1 29); do gwsync set dev/$i \"{\\\"room\\\":$((i % 4)),\\\"on\\\":true}\" \
         || exit 1; done",
    );
    browser.open("data", "!!document.querySelector('#gwsync-range')");
    browser.wait("/of 30$/.test(document.querySelector('#gwsync-range').textContent)");
    let shown = browser.eval("document.querySelectorAll('#gwsync-keys .gwsync-key').length");
    assert_eq!(shown, 25, "keys on the first page");
    browser.click("#gwsync-next");
    browser.wait("/26\\D+30 of 30$/.test(document.querySelector('#gwsync-range').textContent)");
    browser.type_text("#gwsync-prefix", "home/");
    browser.click("#gwsync-filter");
    browser.wait(
        "[...document.querySelectorAll('#gwsync-keys .gwsync-key')].map(k => k.textContent).join() == 'home/1/scene/evening'",
    );
    browser.click(".gwsync-view[data-key='home/1/scene/evening']");
    let pretty = browser.wait(
        "document.querySelector('#gwsync-view-value') && document.querySelector('#gwsync-view-value').textContent",
    );
    assert!(
        pretty.as_str().unwrap().contains("\n  \"lights\": ["),
        "value not pretty-printed: {pretty}"
    );
    browser.eval("L.ui.hideModal()");

    // Edit: invalid JSON is refused in the page, valid JSON reaches the peer.
    browser.click(".gwsync-edit[data-key='home/1/scene/evening']");
    browser.wait("!!document.querySelector('#gwsync-edit-value')");
    browser.type_text("#gwsync-edit-value", r#"{"name": "Evening", "lights": [}"#);
    browser.click("#gwsync-edit-save");
    let error = browser.wait("document.querySelector('#gwsync-edit-error').textContent");
    assert!(
        error.as_str().unwrap().contains("Not valid JSON"),
        "invalid JSON not flagged: {error}"
    );
    browser.shot("data-invalid-json");
    assert_eq!(
        gwsync_get(&gateway, "home/1/scene/evening").as_deref(),
        Some(scene),
        "invalid JSON reached the daemon"
    );
    let edited = r#"{"name":"Evening","lights":[{"id":"l1","on":true,"level":75}]}"#;
    browser.type_text("#gwsync-edit-value", edited);
    browser.click("#gwsync-edit-save");
    browser.wait("!document.body.classList.contains('modal-overlay-active')");
    wait_until(
        "the value edited in the page is read on the peer",
        Duration::from_secs(20),
        || gwsync_get(&peer, "home/1/scene/evening").as_deref() == Some(edited),
    );

    // Add and delete reach the peer too.
    browser.click("#gwsync-add");
    browser.wait("!!document.querySelector('#gwsync-edit-key')");
    browser.type_text("#gwsync-edit-key", "home/1/name");
    browser.type_text("#gwsync-edit-value", r#""Living room""#);
    browser.click("#gwsync-edit-save");
    wait_until(
        "a key added in the page reaches the peer",
        Duration::from_secs(20),
        || gwsync_get(&peer, "home/1/name").as_deref() == Some(r#""Living room""#),
    );
    browser.open(
        "data",
        "/of 31$/.test(document.querySelector('#gwsync-range').textContent)",
    );
    browser.click(".gwsync-delete[data-key='dev/29']");
    browser.wait("!!document.querySelector('#gwsync-delete-confirm')");
    browser.click("#gwsync-delete-confirm");
    wait_until(
        "a key deleted in the page is gone on the peer",
        Duration::from_secs(20),
        || gwsync_get(&peer, "dev/29").is_none(),
    );
    browser.type_text("#gwsync-prefix", "home/");
    browser.click("#gwsync-filter");
    browser.wait("/of 2$/.test(document.querySelector('#gwsync-range').textContent)");
    browser.shot("data");

    // Status again: the page's own writes are among the recent changes, and
    // the peer agrees with us once the edits have reached it.
    browser.open(
        "status",
        "[...document.querySelectorAll('#gwsync-changes .gwsync-change')].some(k => k.textContent == 'home/1/name')",
    );
    let row = peer_row(&mut browser, &peer, &peer_id, true);
    assert!(
        row.as_str().unwrap().to_lowercase().contains("in sync"),
        "peer row: {row}"
    );
    browser.shot("status");
    let exceptions = browser.exceptions();
    assert!(exceptions.is_empty(), "page exceptions: {exceptions:?}");

    // Read-only login: sees everything, every control is disabled, a click
    // changes nothing, and rpcd refuses the calls themselves.
    browser.login(VIEWER, VIEWER_PASSWORD);
    browser.open("status", "!!document.querySelector('#gwsync-node-id')");
    peer_row(&mut browser, &peer, &peer_id, false);
    browser.open(
        "data",
        "/of 30$/.test(document.querySelector('#gwsync-range').textContent)",
    );
    let enabled = browser.eval(
        "[...document.querySelectorAll('#gwsync-add, .gwsync-edit, .gwsync-delete')].filter(b => !b.disabled).length",
    );
    assert_eq!(enabled, 0, "write controls enabled for the read-only login");
    browser.click(".gwsync-edit[data-key='dev/1']");
    browser.click(".gwsync-delete[data-key='dev/2']");
    browser.click("#gwsync-add");
    let modal = browser.eval("document.body.classList.contains('modal-overlay-active')");
    assert_eq!(modal, false, "a disabled control opened a dialog");
    browser.click(".gwsync-view[data-key='dev/1']");
    browser.wait("(document.querySelector('#gwsync-view-value') || {}).textContent");
    browser.shot("data-read-only");
    browser.eval("L.ui.hideModal()");
    let answer = browser.eval(&ubus_from_page(
        "gwsync",
        "set",
        json!({"key": "home/1/name", "value": "hijacked"}),
    ));
    assert_eq!(
        answer["error"]["message"], "Access denied",
        "gwsync set as viewer: {answer}"
    );
    let answer = browser.eval(&ubus_from_page(
        "gwsync",
        "del",
        json!({"key": "home/1/name"}),
    ));
    assert_eq!(
        answer["error"]["message"], "Access denied",
        "gwsync del as viewer: {answer}"
    );
    let answer = browser.eval(&ubus_from_page(
        "uci",
        "set",
        json!({"config": "gwsync", "section": "main", "values": {"port": "1234"}}),
    ));
    assert_eq!(
        answer["error"]["message"], "Access denied",
        "uci set as viewer: {answer}"
    );
    browser.open(
        "settings",
        "!!document.querySelector('.cbi-map select[id$=log_level]')",
    );
    let enabled = browser.eval(
        "[...document.querySelectorAll('.cbi-map input:not([type=hidden]), .cbi-map select, .cbi-map textarea, .cbi-page-actions button')]\
         .filter(e => !e.disabled && e.offsetParent !== null).map(e => e.id || e.className)",
    );
    assert_eq!(
        enabled,
        json!([]),
        "settings controls enabled for the read-only login"
    );
    assert_eq!(
        gwsync_get(&peer, "home/1/name").as_deref(),
        Some(r#""Living room""#),
        "the read-only login changed a value"
    );
    assert!(
        gwsync_get(&peer, "dev/2").is_some(),
        "the read-only login deleted a key"
    );
    assert_eq!(
        gateway
            .sh_ok("uci -q get gwsync.main.port || echo unset")
            .trim(),
        "unset"
    );
    let exceptions = browser.exceptions();
    assert!(
        exceptions.is_empty(),
        "page exceptions as viewer: {exceptions:?}"
    );

    // Settings: Save & Apply restarts the daemon with the new options.
    browser.login("root", ROOT_PASSWORD);
    browser.open(
        "settings",
        "!!document.querySelector('.cbi-map select[id$=log_level]')",
    );
    browser.shot("settings");
    let (old_pid, old_command) = service(&gateway);
    assert!(
        !old_command.iter().any(|word| word == "debug"),
        "log level already debug: {old_command:?}"
    );
    browser.type_text("input[id$=port]", "99999");
    browser.click(".cbi-page-actions .cbi-button-apply");
    browser.wait("!!document.querySelector('input[id$=port].cbi-input-invalid')");
    assert_eq!(
        gateway
            .sh_ok("uci -q get gwsync.main.port || echo unset")
            .trim(),
        "unset"
    );
    browser.type_text("input[id$=port]", "");
    browser.type_text("input[id$=max_entries]", "5000");
    browser.eval(
        "(() => { const s = document.querySelector('select[id$=log_level]'); s.value = 'debug'; \
         s.dispatchEvent(new Event('change', {bubbles: true})); return s.value; })()",
    );
    browser.click(".cbi-page-actions .cbi-button-apply");
    wait_until(
        "Save & Apply restarts gwsync with --log-level debug --max-entries 5000",
        Duration::from_secs(60),
        || {
            let (pid, command) = service(&gateway);
            let has = |flag: &str, value: &str| {
                command
                    .windows(2)
                    .any(|pair| pair[0] == flag && pair[1] == value)
            };
            pid != 0
                && pid != old_pid
                && has("--log-level", "debug")
                && has("--max-entries", "5000")
        },
    );
    assert_eq!(
        gateway
            .sh_ok("uci get gwsync.main.log_level; uci get gwsync.main.max_entries")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["debug", "5000"]
    );
    browser.wait("!document.querySelector('.spinning') && !/Applying configuration/.test(document.body.innerText)");
    gateway.wait_for(
        "the restarted daemon answers on ubus",
        Duration::from_secs(20),
        "ubus call gwsync status",
    );
    let exceptions: Vec<String> = browser
        .exceptions()
        .into_iter()
        // LuCI reports the refused port by throwing from its form code.
        .filter(|problem| !problem.contains("contains an invalid input value"))
        .collect();
    assert!(
        exceptions.is_empty(),
        "page exceptions in settings: {exceptions:?}"
    );

    // A third gateway on the bridge with another key: the status page says
    // that it hears a key it cannot open, and from where.
    let Some(mut stranger) = Router::new(&format!("{TEST}-stranger"), Flavor::Base) else {
        return;
    };
    let other_key = common::gwsync(&["genkey"]);
    assert_eq!(other_key.code, 0, "genkey: {other_key:?}");
    stranger.install_package();
    give_key(&stranger, &other_key.stdout);
    stranger.enable_installed();
    stranger.boot(bridge.port(2));
    stranger.wait_lan_up();
    stranger.wait_for("gwsync runs", Duration::from_secs(20), "gwsync status");
    stranger.sh_ok("gwsync trigger");
    browser.open("status", "!!document.querySelector('#gwsync-key-state')");
    let key_state = browser.wait(
        "(() => { const k = document.querySelector('#gwsync-key-state'); return k.dataset.state == 'other' && k.innerText; })()",
    );
    assert!(
        key_state.as_str().unwrap().contains("10.73.0.3"),
        "the other key's sender is not named: {key_state}"
    );
    let overview = browser.eval("document.querySelector('#gwsync-overview').innerText");
    assert!(
        overview.as_str().unwrap().contains("limits 5000 entries"),
        "the new limit is not in force: {overview}"
    );
    browser.shot("status-other-key");

    // The page refreshes itself: a change made on the peer now shows up
    // without a reload.
    let marker = browser.eval("window.gwsyncNoReload = true");
    assert_eq!(marker, true);
    peer.sh_ok("gwsync set live/refresh true");
    browser.wait(
        "window.gwsyncNoReload && [...document.querySelectorAll('#gwsync-changes .gwsync-change')].some(k => k.textContent == 'live/refresh')",
    );

    // The daemon stopped: both pages say so instead of failing.
    gateway.sh_ok("/etc/init.d/gwsync stop");
    browser.wait(
        "window.gwsyncNoReload && getComputedStyle(document.querySelector('#gwsync-missing')).display != 'none' \
         && getComputedStyle(document.querySelector('#gwsync-sections')).display == 'none'",
    );
    let said = browser.open(
        "data",
        "getComputedStyle(document.querySelector('#gwsync-data-error')).display != 'none' \
         && document.querySelector('#gwsync-data-error').textContent",
    );
    assert!(
        said.as_str().unwrap().contains("does not answer"),
        "data page without the daemon: {said}"
    );
    let exceptions = browser.exceptions();
    assert!(exceptions.is_empty(), "page exceptions: {exceptions:?}");
}
