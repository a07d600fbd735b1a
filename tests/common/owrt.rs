//! OpenWrt routers for tests: OpenWrt 24.10's own procd, ubusd, logd,
//! netifd, uci, rc.common and hotplug-call (built from source by
//! `../shared/openwrt-userland/build.sh`, with LuCI on top by
//! `../shared/openwrt-luci/build.sh`), booted as PID 1 in fresh namespaces,
//! with the gwsync package installed the way its Makefile's
//! `Package/gwsync/install` and opkg do.
//!
//! ```ignore
//! let Some(mut router) = owrt::Router::new("my_test", owrt::Flavor::Base) else { return };
//! router.install_package();      // files only, as in an image
//! router.enable_installed();     // what the image build's postinst does
//! router.boot(owrt::Net::Alone);
//! router.wait_lan_up();
//! let out = router.sh_ok("gwsync status");
//! ```
//!
//! Environment: `GWSYNC_OWRT_DIR` (the build cache, default /tmp/owrt-luci)
//! and `GWSYNC_SHARED_DIR` (the OpenWrt sources and build scripts, default
//! `<repo>/../shared`). When neither a built userland nor its sources exist,
//! the test skips (fails under CI=1, see [`super::skip`]).
//!
//! Everything is torn down on drop, also when the test fails: the router's
//! PID 1 is killed, which ends every process, mount and network device of its
//! namespaces, and its private copy of the rootfs is removed.

use super::{
    CliResult, TempDir, cli_result, is_root, runner_argv, skip, skip_on_emulator, wait_until,
};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Which prebuilt root filesystem to boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// procd, ubus, logd, netifd, uci, rpcd (`$GWSYNC_OWRT_DIR/rootfs`).
    Base,
    /// Base plus uhttpd, ucode and LuCI (`$GWSYNC_OWRT_DIR/luci-rootfs`).
    Luci,
}

/// Where a router's `eth0` (the device of its uci network `lan`) leads.
#[derive(Clone, Debug)]
pub enum Net {
    /// A veth pair inside the router's own namespace: `lan` comes up, but
    /// nothing answers on it.
    Alone,
    /// The other end sits on the bridge of `bridge`, as port `index`; `lan`
    /// gets 10.73.0.(index + 1)/24.
    Bridge { hub: String, index: usize },
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The OpenWrt sources and build scripts.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("GWSYNC_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"))
}

/// The userland build cache.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("GWSYNC_OWRT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/owrt-luci"))
}

/// The package directory (Makefile, files/).
pub fn package_dir() -> PathBuf {
    repo().join("openwrt/gwsync")
}

/// The clean environment of a shell on the router.
const ROUTER_ENV: [&str; 3] = ["-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"];

fn run_ok(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Checks the preconditions and makes sure the userland of `flavor` is
/// built. `None` (after saying why) when the test cannot run here.
fn prebuilt_rootfs(
    test: &str,
    flavor: Flavor,
) -> Option<(PathBuf, nix::fcntl::Flock<std::fs::File>)> {
    if !runner_argv().is_empty() {
        skip_on_emulator(&format!(
            "{test}: the OpenWrt userland is an x86_64 build; it cannot run the target's binary"
        ));
        return None;
    }
    if !is_root() {
        skip(&format!(
            "{test}: booting OpenWrt in namespaces needs root (CI runs it as root)"
        ));
        return None;
    }
    for tool in ["unshare", "nsenter", "ip", "ldd"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |output| !output.status.success())
        {
            skip(&format!("{test}: {tool} not found"));
            return None;
        }
    }
    let cache = cache_dir();
    let (script, rootfs, built) = match flavor {
        Flavor::Base => (
            shared_dir().join("openwrt-userland/build.sh"),
            cache.join("rootfs"),
            cache.join("rootfs/etc/openwrt-rt.txt"),
        ),
        Flavor::Luci => (
            shared_dir().join("openwrt-luci/build.sh"),
            cache.join("luci-rootfs"),
            cache.join("luci-rootfs/usr/share/ucode/luci/uhttpd.uc"),
        ),
    };
    std::fs::create_dir_all(&cache).expect("create the OpenWrt cache dir");
    // One lock for building and copying: build.sh replaces the rootfs, so no
    // test may copy it meanwhile.
    let lock = std::fs::File::options()
        .create(true)
        .append(true)
        .open(cache.join(".gwsync-tests.lock"))
        .expect("open the OpenWrt cache lock");
    let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .expect("lock the OpenWrt cache");
    if !built.exists() {
        if !script.exists() {
            skip(&format!(
                "{test}: no OpenWrt userland at {} and no sources to build it: {} is missing \
                 (set GWSYNC_SHARED_DIR to the directory holding openwrt-userland/, or \
                 GWSYNC_OWRT_DIR to a built cache)",
                rootfs.display(),
                script.display()
            ));
            return None;
        }
        let log = cache.join("gwsync-tests-build.log");
        eprintln!(
            "{test}: building the OpenWrt userland with {} (log: {})",
            script.display(),
            log.display()
        );
        let output = std::fs::File::create(&log).expect("create the build log");
        let status = Command::new("bash")
            .arg(&script)
            .env("OWRT", &cache)
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("build log"))
            .stderr(output)
            .status()
            .expect("run the OpenWrt userland build");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        assert!(
            status.success() && built.exists(),
            "{} failed ({status}); end of {}:\n{}",
            script.display(),
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Some((rootfs, lock))
}

/// A network bridge in a namespace of its own, for several routers; deleted
/// on drop.
pub struct Bridge {
    pub hub: String,
}

impl Bridge {
    pub fn new() -> Bridge {
        let hub = format!(
            "gwowrt{}x{}-hub",
            std::process::id() % 100_000,
            super::unique()
        );
        // Built first, so that its drop removes a half-made hub.
        let bridge = Bridge { hub };
        super::add_hub(&bridge.hub);
        bridge
    }

    /// Where router `index` plugs in.
    pub fn port(&self, index: usize) -> Net {
        Net::Bridge {
            hub: self.hub.clone(),
            index,
        }
    }
}

impl Default for Bridge {
    fn default() -> Self {
        Bridge::new()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub])
            .output();
    }
}

/// One OpenWrt router: a private copy of the rootfs and, once booted, procd
/// as PID 1 of fresh pid, mount, network, uts and ipc namespaces.
pub struct Router {
    pub name: String,
    dir: TempDir,
    root: PathBuf,
    net: Net,
    /// `unshare`, whose child becomes procd.
    unshare: Option<Child>,
    /// procd's pid as the host sees it.
    pid: Option<u32>,
    boots: u32,
}

impl Router {
    /// Copies the prebuilt rootfs of `flavor` to a private directory and
    /// writes a network config with `lan` on `eth0`. `None` (after saying
    /// why) when the test cannot run here.
    pub fn new(test: &str, flavor: Flavor) -> Option<Router> {
        let (rootfs, lock) = prebuilt_rootfs(test, flavor)?;
        let dir = TempDir::new(&format!("owrt-{test}"));
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        // Still under the lock: build.sh must not replace the rootfs mid-copy.
        run_ok(
            "cp",
            &[
                "-a",
                &format!("{}/.", rootfs.display()),
                root.to_str().unwrap(),
            ],
        );
        drop(lock);
        let router = Router {
            name: test.to_owned(),
            dir,
            root,
            net: Net::Alone,
            unshare: None,
            pid: None,
            boots: 0,
        };
        router.write(
            "etc/config/system",
            "config system\n\toption hostname 'OpenWrt'\n\toption timezone 'UTC'\n\
             \toption log_size '256'\n",
        );
        std::fs::create_dir_all(router.root.join("tmp/lock")).unwrap();
        router.repair_links();
        router.copy_missing_libraries(Path::new(super::BIN));
        Some(router)
    }

    /// The router's root directory as the host sees it (writable before and
    /// while it runs).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A file of the router, by its path on the router.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Writes a file of the router (parents created).
    pub fn write(&self, path: &str, text: &str) {
        let path = self.path(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
    }

    /// OpenWrt ships /sbin/ifdown as a symlink to ifup (which acts on its
    /// name); the userland build copies some as a file holding the link's
    /// target, which runs as a script calling `ifup` with no arguments.
    fn repair_links(&self) {
        for path in ["sbin/ifdown"] {
            let file = self.root.join(path);
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let target = text.trim();
            if !target.is_empty()
                && !target.contains(char::is_whitespace)
                && file.with_file_name(target).exists()
            {
                std::fs::remove_file(&file).unwrap();
                std::os::unix::fs::symlink(target, &file).unwrap();
            }
        }
    }

    /// The shared libraries `binary` needs that the rootfs lacks (libgcc_s
    /// for a Rust binary: on OpenWrt the libgcc package provides it).
    fn copy_missing_libraries(&self, binary: &Path) {
        let ldd = run_ok("ldd", &[binary.to_str().unwrap()]);
        for line in ldd.lines() {
            let Some(host) = line
                .split("=>")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
            else {
                continue;
            };
            let inside = self.path(host);
            if host.starts_with('/') && !inside.exists() {
                std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
                std::fs::copy(host, &inside).unwrap();
            }
        }
    }

    /// Installs the package's files into the rootfs the way the Makefile's
    /// `Package/gwsync/install` does (read from the Makefile itself, with the
    /// cargo-built binary for `$(PKG_INSTALL_DIR)/bin/gwsync`), and writes
    /// opkg's records of it: the file list, conffiles, control and the
    /// postinst/prerm scripts OpenWrt's package-pkg.mk generates.
    pub fn install_package(&self) {
        let makefile = std::fs::read_to_string(package_dir().join("Makefile")).unwrap();
        let mut installed = Vec::new();
        for line in define_block(&makefile, "Package/gwsync/install") {
            let words: Vec<&str> = line.split_whitespace().collect();
            let Some((&command, args)) = words.split_first() else {
                continue;
            };
            let mode = match command {
                "$(INSTALL_DIR)" => {
                    for dir in args {
                        std::fs::create_dir_all(self.package_path(dir)).unwrap();
                    }
                    continue;
                }
                "$(INSTALL_BIN)" => 0o755,
                "$(INSTALL_DATA)" => 0o644,
                "$(INSTALL_CONF)" => 0o600,
                _ => panic!("the test harness does not know this install step: {line}"),
            };
            let (dest, sources) = args.split_last().expect("install step without files");
            for source in sources {
                let from = source_path(source);
                let mut to = self.package_path(dest);
                if dest.ends_with('/') || to.is_dir() {
                    to = to.join(from.file_name().unwrap());
                }
                std::fs::copy(&from, &to)
                    .unwrap_or_else(|error| panic!("install {source}: {error}"));
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
                installed.push(format!(
                    "/{}",
                    to.strip_prefix(&self.root).unwrap().display()
                ));
            }
        }
        let info = self.path("usr/lib/opkg/info");
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(info.join("gwsync.list"), installed.join("\n") + "\n").unwrap();
        std::fs::write(
            info.join("gwsync.conffiles"),
            define_block(&makefile, "Package/gwsync/conffiles").join("\n") + "\n",
        )
        .unwrap();
        std::fs::write(
            info.join("gwsync.control"),
            "Package: gwsync\nVersion: test\nDepends: libc\nArchitecture: x86_64\n",
        )
        .unwrap();
        // package-pkg.mk: the package's own script is `<pkg>.postinst-pkg`,
        // sourced by default_postinst, which also enables and starts every
        // init script of the package on a live system.
        // The wrappers as package-pkg.mk writes them (24.10).
        let wrappers = [
            (
                "postinst",
                "#!/bin/sh\n[ \"${IPKG_NO_SCRIPT}\" = \"1\" ] && exit 0\n\
                 [ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n\
                 . ${IPKG_INSTROOT}/lib/functions.sh\ndefault_postinst $0 $@\n",
            ),
            (
                "prerm",
                "#!/bin/sh\n[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n\
                 . ${IPKG_INSTROOT}/lib/functions.sh\ndefault_prerm $0 $@\n",
            ),
        ];
        for (script, wrapper_text) in wrappers {
            let own = define_block(&makefile, &format!("Package/gwsync/{script}"));
            if !own.is_empty() {
                std::fs::write(
                    info.join(format!("gwsync.{script}-pkg")),
                    own.join("\n") + "\n",
                )
                .unwrap();
            }
            let wrapper = info.join(format!("gwsync.{script}"));
            std::fs::write(&wrapper, wrapper_text).unwrap();
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    /// `$(1)/x` of an install step: the router's /x.
    fn package_path(&self, word: &str) -> PathBuf {
        let rest = word
            .strip_prefix("$(1)")
            .unwrap_or_else(|| panic!("install destination outside $(1): {word}"));
        self.path(rest)
    }

    /// What an image build does with an installed package before its first
    /// boot: the postinst with IPKG_INSTROOT set (which enables the init
    /// scripts), then [`Router::run_uci_defaults`] as the first boot would.
    pub fn enable_installed(&self) {
        let result = self.chroot("IPKG_INSTROOT=/ /usr/lib/opkg/info/gwsync.postinst");
        assert_eq!(result.code, 0, "postinst in the image: {result:?}");
        self.run_uci_defaults();
    }

    /// What /etc/init.d/boot does on a first boot (which the namespace boot
    /// replaces): runs each /etc/uci-defaults script and removes those that
    /// succeed. Runs in a chroot of the rootfs, before [`Router::boot`].
    pub fn run_uci_defaults(&self) {
        let result = self.chroot(
            "mkdir -p /tmp/.uci; cd /etc/uci-defaults 2> /dev/null || exit 0; for f in *; do \
             [ -f \"$f\" ] || continue; ( . /lib/functions.sh; . \"./$f\" ) && rm -f \"$f\"; \
             done; uci commit",
        );
        assert_eq!(result.code, 0, "uci-defaults: {result:?}");
    }

    /// Runs `script` with /bin/sh in a chroot of the (not booted) rootfs.
    pub fn chroot(&self, script: &str) -> CliResult {
        let output = Command::new("chroot")
            .arg(&self.root)
            .arg("/usr/bin/env")
            .args(ROUTER_ENV)
            .args(["/bin/sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("chroot");
        cli_result(output)
    }

    /// Boots the router: procd as PID 1 with `eth0` as `net` says. On the
    /// first boot it enables the system, log, network and rpcd services (an
    /// image has them on); enable others (uhttpd) with [`Router::chroot`]
    /// before.
    pub fn boot(&mut self, net: Net) {
        assert!(
            self.pid.is_none(),
            "{}: boot of a running router",
            self.name
        );
        if self.boots == 0 {
            self.net = net;
            self.write_network_config();
            let result = self
                .chroot("for s in system log network; do /etc/init.d/$s enable || exit 1; done");
            assert_eq!(result.code, 0, "enable the base services: {result:?}");
        }
        self.boots += 1;
        let console = self.dir.path().join(format!("console.{}", self.boots));
        // procd's early init and /etc/init.d/boot, as the userland README
        // says; it waits for one line on stdin, sent once eth0 is in place.
        let init = r#"
R=$1
mount --make-rprivate /
mount -t proc proc "$R/proc"
mount --bind /dev/null "$R/proc/kmsg"
mount -t sysfs -o ro sysfs "$R/sys"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$R/dev"
for d in null zero random urandom tty; do touch "$R/dev/$d"; mount --bind /dev/$d "$R/dev/$d"; done
: > "$R/dev/kmsg"
ln -s /tmp/shm "$R/dev/shm"; mkdir -p "$R/dev/pts"
mkdir -p "$R/tmp/run" "$R/tmp/lock" "$R/tmp/log" "$R/tmp/.uci" "$R/tmp/state" "$R/tmp/shm"
chmod 1777 "$R/tmp/lock"
hostname OpenWrt
ip link set lo up
read -r go || exit 1
ip link set eth0 multicast on
exec env -i container=openwrt-rt /usr/sbin/chroot "$R" /sbin/procd </dev/null
"#;
        let console_file = std::fs::File::create(&console).unwrap();
        let mut command = Command::new("unshare");
        // --kill-child: procd dies with unshare, and unshare with the test
        // (PR_SET_PDEATHSIG), so a killed test run leaves no router behind.
        command
            .args([
                "--fork",
                "--kill-child",
                "--pid",
                "--mount",
                "--net",
                "--uts",
                "--ipc",
                "/bin/sh",
                "-c",
                init,
                "sh",
            ])
            .arg(&self.root);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let unshare = command
            .stdin(Stdio::piped())
            .stdout(console_file.try_clone().unwrap())
            .stderr(console_file)
            .spawn()
            .expect("unshare");
        let unshare_pid = unshare.id();
        let mut child = None;
        wait_until(
            "the router's init shell runs",
            Duration::from_secs(10),
            || {
                child = std::fs::read_to_string(format!(
                    "/proc/{unshare_pid}/task/{unshare_pid}/children"
                ))
                .ok()
                .and_then(|text| text.split_whitespace().next()?.parse::<u32>().ok());
                child.is_some()
            },
        );
        let pid = child.unwrap();
        self.unshare = Some(unshare);
        self.pid = Some(pid);
        let pid_text = pid.to_string();
        match &self.net {
            Net::Alone => {
                for args in [
                    &[
                        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
                    ][..],
                    &["link", "set", "eth0p", "up"],
                ] {
                    let mut full = vec!["-t", &pid_text, "-n", "ip"];
                    full.extend_from_slice(args);
                    run_ok("nsenter", &full);
                }
            }
            Net::Bridge { hub, index } => {
                let port = format!("vr{index}");
                run_ok(
                    "ip",
                    &[
                        "-n", hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                        "netns", &pid_text,
                    ],
                );
                run_ok(
                    "ip",
                    &["-n", hub, "link", "set", &port, "master", "br0", "up"],
                );
            }
        }
        let unshare = self.unshare.as_mut().unwrap();
        let mut stdin = unshare.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        drop(stdin);
        let root = self.root.join("sbin/procd");
        wait_until(
            &format!(
                "procd runs as PID 1 of {} (console: {})",
                self.name,
                console.display()
            ),
            Duration::from_secs(10),
            || std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == root),
        );
        // The end of /etc/init.d/boot: reload_config remembers the configs'
        // checksums, so that a later reload_config sees what changed.
        self.sh_ok("/sbin/reload_config");
    }

    fn write_network_config(&self) {
        let address = match &self.net {
            Net::Alone => "10.73.0.1".to_owned(),
            Net::Bridge { index, .. } => format!("10.73.0.{}", index + 1),
        };
        self.write(
            "etc/config/network",
            &format!(
                "config interface 'loopback'\n\toption device 'lo'\n\toption proto 'static'\n\
                 \toption ipaddr '127.0.0.1'\n\toption netmask '255.0.0.0'\n\n\
                 config interface 'lan'\n\toption device 'eth0'\n\toption proto 'static'\n\
                 \toption ipaddr '{address}'\n\toption netmask '255.255.255.0'\n"
            ),
        );
    }

    /// procd's pid on the host, while the router runs.
    pub fn pid(&self) -> u32 {
        self.pid
            .unwrap_or_else(|| panic!("{} is not running", self.name))
    }

    /// Runs `script` with /bin/sh on the router, in every namespace of its
    /// procd and a clean environment, as a root shell on the router would.
    pub fn sh(&self, script: &str) -> CliResult {
        let output = Command::new("nsenter")
            .args([
                "-t",
                &self.pid().to_string(),
                "-m",
                "-u",
                "-n",
                "-p",
                "-i",
                "-r",
                "-w",
            ])
            .arg("/usr/bin/env")
            .args(ROUTER_ENV)
            .args(["/bin/sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("nsenter");
        cli_result(output)
    }

    /// Like [`Router::sh`], failing the test unless `script` succeeds;
    /// returns its stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let result = self.sh(script);
        assert_eq!(result.code, 0, "{}: `{script}`: {result:?}", self.name);
        result.stdout
    }

    /// Runs the host's `ip ARGS` in the router's network namespace (the
    /// router's busybox ip cannot create veth pairs), failing the test
    /// unless it succeeds.
    pub fn ip(&self, args: &[&str]) {
        let pid = self.pid().to_string();
        let mut full = vec!["-t", &pid, "-n", "ip"];
        full.extend_from_slice(args);
        run_ok("nsenter", &full);
    }

    /// Waits until netifd reports the uci network `lan` up.
    pub fn wait_lan_up(&self) {
        self.wait_for(
            "netifd reports lan up",
            Duration::from_secs(30),
            "ubus call network.interface.lan status | jsonfilter -e '@.up' | grep -qx true",
        );
    }

    /// Polls `script` on the router until it succeeds; fails the test with
    /// the router's log after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, script: &str) {
        let deadline = std::time::Instant::now() + timeout;
        while self.sh(script).code != 0 {
            if std::time::Instant::now() >= deadline {
                panic!(
                    "{}: timed out after {timeout:?} waiting until {what} (`{script}`); logread:\n{}",
                    self.name,
                    self.sh("logread | tail -40").stdout
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Power cut: kills procd (PID 1), which ends every process, mount and
    /// device of the router. Files on the rootfs stay; /tmp is lost.
    pub fn halt(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut unshare) = self.unshare.take() {
            let _ = unshare.wait();
        }
        if let Net::Bridge { hub, index } = &self.net {
            // The veth pair dies with the namespace; wait so that a new boot
            // can create the port again.
            let port = format!("vr{index}");
            wait_until(
                "the old bridge port is gone",
                Duration::from_secs(10),
                || {
                    !Command::new("ip")
                        .args(["-n", hub, "link", "show", &port])
                        .output()
                        .is_ok_and(|output| output.status.success())
                },
            );
        }
    }

    /// `reboot` on the router: procd stops every service (their K scripts,
    /// SIGTERM) and ends the namespace; then it boots again with the same
    /// rootfs and network.
    pub fn reboot_clean(&mut self) {
        self.sh_ok("reboot");
        let unshare = self.unshare.as_mut().expect("running");
        wait_until(
            &format!("{} shuts down", self.name),
            Duration::from_secs(60),
            || unshare.try_wait().is_ok_and(|status| status.is_some()),
        );
        self.halt();
        let net = self.net.clone();
        self.boot(net);
    }

    /// Halts (power cut) and boots again with the same rootfs and network.
    pub fn reboot(&mut self) {
        self.halt();
        let net = self.net.clone();
        self.boot(net);
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if std::thread::panicking() && self.pid.is_some() {
            eprintln!(
                "--- logread of {} ---\n{}",
                self.name,
                self.sh("logread").stdout
            );
        }
        self.halt();
    }
}

/// The lines of `define NAME` ... `endef` in a Makefile, without their
/// leading tabs; empty when there is no such block.
pub fn define_block(makefile: &str, name: &str) -> Vec<String> {
    let header = format!("define {name}");
    makefile
        .lines()
        .skip_while(|line| line.trim_end() != header)
        .skip(1)
        .take_while(|line| line.trim_end() != "endef")
        .map(|line| line.trim_start_matches('\t').to_owned())
        .collect()
}

/// A source word of an install step: the cargo-built binary, a file of the
/// checkout (`$(PKG_BUILD_DIR)` is a copy of it) or of the package dir.
fn source_path(word: &str) -> PathBuf {
    if word == "$(PKG_INSTALL_DIR)/bin/gwsync" {
        PathBuf::from(super::BIN)
    } else if let Some(rest) = word.strip_prefix("$(PKG_BUILD_DIR)/") {
        repo().join(rest)
    } else if let Some(rest) = word.strip_prefix("./") {
        package_dir().join(rest)
    } else {
        panic!("the test harness does not know this install source: {word}")
    }
}
