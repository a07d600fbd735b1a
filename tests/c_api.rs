//! The C API as C sees it: the header is what cbindgen generates today,
//! and real C programs (tests/c/*.c, examples/c/gateway.c), compiled with
//! the system `cc` against include/gwsync.h and libgwsync.a with the link
//! line of gwsync.pc, sync with each other over loopback multicast, under
//! valgrind's memcheck and helgrind where it is installed. Under a cross
//! test the same programs are built with the cross gcc for the router CPU
//! and run under qemu (see [`CToolchain`]); only valgrind's checks skip.
//!
//! libgwsync.a comes from the same cargo build as this test (the library
//! has the `staticlib` crate type, so building the test builds it); when it
//! is missing the test builds it with `cargo build --lib`.
//!
//! valgrind missing: the valgrind tests say so and pass, unless `CI` is set
//! (then they fail: CI must install it, see .ci/run).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{TempDir, target_command, unique_port};

const SYNC_TIMEOUT: Duration = Duration::from_secs(20);
/// valgrind runs code 20 to 100 times slower.
const VALGRIND_TIMEOUT: Duration = Duration::from_secs(120);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>: this test runs from target/<profile>/deps.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable in target/<profile>/deps")
        .to_owned()
}

/// The target triple under a cross test (the test runs from
/// target/<triple>/<profile>/deps), `None` on the host (target/<profile>).
/// Told by where the target directory's CACHEDIR.TAG is: cargo may write
/// one into target/<triple> too.
fn cross_triple() -> Option<String> {
    let parent = profile_dir().parent().expect("target dir").to_owned();
    let target_dir = parent.parent()?;
    if !target_dir.join("CACHEDIR.TAG").exists() {
        return None;
    }
    let triple = parent.file_name().and_then(|name| name.to_str());
    Some(triple.expect("target triple").to_owned())
}

/// libgwsync.a, fresh: `cargo test` builds the library's staticlib under
/// target/<profile>/deps with a hash in its name and does not copy it up to
/// target/<profile>/libgwsync.a, so this runs `cargo build --lib` with the
/// same target directory and profile (a no-op when nothing changed).
fn staticlib() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile = profile_dir();
            let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cargo.args(["build", "--lib"]).current_dir(manifest_dir());
            let parent = profile.parent().expect("target dir");
            // target/<triple>/<profile> when built with --target.
            let target_dir = match cross_triple() {
                None => parent,
                Some(triple) => {
                    cargo.args(["--target", &triple]);
                    // ../shared/cross builds std from source for the router
                    // CPUs, which have no prebuilt one in its toolchain.
                    if std::env::var_os("RUSTC_BOOTSTRAP").is_some() {
                        cargo.arg("-Zbuild-std=std,panic_abort");
                    }
                    parent.parent().expect("target dir")
                }
            };
            cargo.env("CARGO_TARGET_DIR", target_dir);
            match profile.file_name().and_then(|name| name.to_str()) {
                Some("debug") => {}
                Some("release") => {
                    cargo.arg("--release");
                }
                Some(other) => {
                    cargo.args(["--profile", other]);
                }
                None => panic!("no profile in {}", profile.display()),
            }
            let output = cargo.output().expect("run cargo build --lib");
            assert!(
                output.status.success(),
                "cargo build --lib failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let lib = profile.join("libgwsync.a");
            assert!(lib.exists(), "{} missing after the build", lib.display());
            lib
        })
        .clone()
}

/// Cflags and Libs of gwsync.pc with `libdir` and `includedir` pointing
/// into this tree, expanded as pkg-config does: the link line C users get.
fn pc_flags(libdir: &Path) -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(manifest_dir().join("gwsync.pc")).expect("read gwsync.pc");
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert("libdir".into(), libdir.display().to_string());
    let include = manifest_dir().join("include");
    vars.insert("includedir".into(), include.display().to_string());
    let expand = |value: &str, vars: &HashMap<String, String>| {
        let mut out = value.to_owned();
        for (name, value) in vars {
            out = out.replace(&format!("${{{name}}}"), value);
        }
        out
    };
    let (mut cflags, mut libs) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        if let Some((field, value)) = line.split_once(':') {
            let words = expand(value, &vars)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            match field.trim() {
                "Cflags" => cflags = words,
                "Libs" => libs = words,
                _ => {}
            }
        } else if let Some((name, value)) = line.split_once('=') {
            let value = expand(value.trim(), &vars);
            vars.entry(name.trim().to_owned()).or_insert(value);
        }
    }
    assert!(libs.iter().any(|word| word == "-lgwsync"), "Libs: {libs:?}");
    (cflags, libs)
}

/// Compiles one C program (once per test run) and returns its path.
fn compile(source: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(source) {
        return path.clone();
    }
    let lib = staticlib();
    let out_dir = profile_dir().join("c-api");
    std::fs::create_dir_all(&out_dir).unwrap();
    let name = Path::new(source).file_stem().unwrap().to_str().unwrap();
    let exe = out_dir.join(name);
    let toolchain = c_toolchain().expect("a C toolchain (checked by can_build_c)");
    let (cflags, libs) = pc_flags(lib.parent().unwrap());
    // nextest runs each test in its own process, and each compiles the
    // programs it runs: the linker writing the path another test is
    // executing fails that exec with ETXTBSY. Linked under a name of our
    // own and renamed into place, a running program keeps its old inode.
    let linked = out_dir.join(format!("{name}.{}", std::process::id()));
    let output = Command::new(&toolchain.cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .args(&toolchain.cflags)
        .args(&cflags)
        .args(&toolchain.link_before)
        .arg(manifest_dir().join(source))
        .arg("-o")
        .arg(&linked)
        .args(toolchain.libs(&libs))
        .args(&toolchain.link_after)
        .output()
        .expect("run the C compiler");
    assert!(
        output.status.success(),
        "cc {source} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&linked, &exe).unwrap();
    built.insert(source.to_owned(), exe.clone());
    exe
}

/// How C programs are built for the CPU these tests run on: the system
/// `cc` on the host; under a cross test (scripts/ci-cross.sh) the cross gcc
/// that ../shared/cross names in `CC_<triple>`, with its `CFLAGS_<triple>`.
/// musl targets link statically against the toolchain's self-contained
/// musl, as rustc links the tests, so qemu needs no sysroot; glibc targets
/// link as on the host and run with the runner's sysroot.
struct CToolchain {
    cc: String,
    cflags: Vec<String>,
    link_before: Vec<String>,
    link_after: Vec<String>,
    /// Static musl: libc.a holds pthread, libm and the rest, so of
    /// gwsync.pc's Libs (written for glibc) only the library itself is kept.
    musl_static: bool,
}

impl CToolchain {
    /// A compiler that links as the host does (dynamically, with the
    /// system libraries gwsync.pc lists).
    fn dynamic(cc: String, cflags: Vec<String>) -> CToolchain {
        CToolchain {
            cc,
            cflags,
            link_before: Vec::new(),
            link_after: Vec::new(),
            musl_static: false,
        }
    }

    fn libs(&self, pc_libs: &[String]) -> Vec<String> {
        if !self.musl_static {
            let mut libs = pc_libs.to_vec();
            libs.push("-pthread".into());
            return libs;
        }
        pc_libs
            .iter()
            .filter(|word| word.starts_with("-L") || *word == "-lgwsync")
            .cloned()
            .collect()
    }
}

/// The toolchain, or why there is none.
fn c_toolchain() -> Result<&'static CToolchain, &'static str> {
    static TOOLCHAIN: OnceLock<Result<CToolchain, String>> = OnceLock::new();
    TOOLCHAIN
        .get_or_init(|| {
            let Some(triple) = cross_triple() else {
                return Ok(CToolchain::dynamic("cc".into(), Vec::new()));
            };
            let suffix = triple.replace('-', "_");
            let var = |prefix: &str| std::env::var(format!("{prefix}_{suffix}"));
            let cc = var("CC").map_err(|_| {
                format!(
                    "no cross C compiler for {triple} (CC_{suffix} unset; ../shared/cross/cross-test.sh sets it)"
                )
            })?;
            let cflags = var("CFLAGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !triple.contains("musl") {
                return Ok(CToolchain::dynamic(cc, cflags));
            }
            let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
            let libdir = Command::new(&rustc)
                .args(["--target", &triple, "--print", "target-libdir"])
                .output()
                .map_err(|error| format!("{rustc} --print target-libdir: {error}"))?;
            let libdir = String::from_utf8_lossy(&libdir.stdout).trim().to_owned();
            let musl = Path::new(&libdir).join("self-contained");
            if !musl.join("libc.a").exists() {
                return Err(format!("no self-contained musl in {}", musl.display()));
            }
            let object = |name: &str| musl.join(name).display().to_string();
            Ok(CToolchain {
                cc,
                cflags,
                link_before: vec![
                    "-nostartfiles".into(),
                    object("crt1.o"),
                    object("crti.o"),
                    object("crtbegin.o"),
                ],
                link_after: vec![
                    format!("-L{}", musl.display()),
                    "-Wl,-Bstatic".into(),
                    "-lunwind".into(),
                    "-lc".into(),
                    "-static".into(),
                    "-no-pie".into(),
                    "-nodefaultlibs".into(),
                    "-Wl,--gc-sections".into(),
                    object("crtend.o"),
                    object("crtn.o"),
                ],
                musl_static: true,
            })
        })
        .as_ref()
        .map_err(String::as_str)
}

/// Whether C programs can be built for the CPU these tests run on; says
/// why not when they cannot, and the test then skips.
fn can_build_c() -> bool {
    match c_toolchain() {
        Ok(_) => true,
        Err(why) => {
            common::skip(why);
            false
        }
    }
}

/// Whether valgrind is there; without it a test skips (fails under CI).
fn have_valgrind() -> bool {
    if let Some(triple) = cross_triple() {
        common::skip_on_emulator(&format!(
            "valgrind checks host code, not {triple} under qemu"
        ));
        return false;
    }
    let found = common::tool_found("valgrind");
    if !found {
        common::skip("valgrind is not installed (apt-get install valgrind)");
    }
    found
}

fn memcheck(program: &Path) -> Command {
    let mut command = Command::new("valgrind");
    command.args([
        "--quiet",
        "--leak-check=full",
        "--show-leak-kinds=definite,indirect,possible",
        "--errors-for-leak-kinds=definite,indirect,possible",
        "--error-exitcode=1",
    ]);
    command.arg(program);
    command
}

fn helgrind(program: &Path) -> Command {
    let mut command = Command::new("valgrind");
    // No suppressions: the handle locks with pthread mutexes, which
    // helgrind understands (see `Lock` in src/ffi.rs).
    command
        .args(["--quiet", "--tool=helgrind", "--error-exitcode=1"])
        .arg(program);
    command
}

/// A running C program: lines from its stdout arrive on a channel, its
/// stderr is kept for failure messages.
struct Program {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    timeout: Duration,
}

impl Program {
    fn spawn(name: &str, mut command: Command, timeout: Duration) -> Program {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("start {name}: {error}"));
        let (sender, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let kept = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(len @ 1..) = pipe.read(&mut buffer) {
                kept.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..len]));
            }
        });
        Program {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
            timeout,
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "{}: {what}\nstdout so far:\n{}\nstderr:\n{}",
            self.name,
            self.seen.join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        if writeln!(stdin, "{line}").is_err() {
            self.fail(&format!("could not send {line:?}"));
        }
    }

    /// Takes stdout lines until one satisfies `wanted`; fails at the
    /// deadline with everything seen.
    fn expect(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("timed out waiting for {what}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail(&format!("exited while waiting for {what}"))
                }
            }
        }
    }

    fn expect_line(&mut self, line: &str) {
        self.expect(&format!("{line:?}"), |seen| seen == line);
    }

    /// Asks with `command`, returns the next line that starts with one of
    /// `answers`.
    fn ask(&mut self, command: &str, answers: &[&str]) -> String {
        self.send(command);
        self.expect(&format!("an answer to {command:?}"), |line| {
            answers.iter().any(|answer| line.starts_with(answer))
        })
    }

    /// Waits for the program to exit by itself (closing its stdin first).
    fn wait(mut self) -> (ExitStatus, String) {
        drop(self.stdin.take());
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The stdout thread ends at EOF: collect what is left.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push(line);
                }
                let stderr = self.stderr.lock().unwrap().clone();
                if !status.success() {
                    self.fail(&format!("exited with {status}"));
                }
                return (status, stderr);
            }
            if Instant::now() >= deadline {
                self.fail("did not exit in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_id(index: u64) -> String {
    format!("{:016x}", 0xa0 + index)
}

/// tests/c/node.c on `port` with id [`node_id`]`(index)`, optionally run
/// through `wrap` (valgrind).
fn start_node(port: u16, index: u64, wrap: Option<fn(&Path) -> Command>) -> Program {
    start_node_keyed(port, index, wrap, None)
}

fn start_node_keyed(
    port: u16,
    index: u64,
    wrap: Option<fn(&Path) -> Command>,
    key_file: Option<&Path>,
) -> Program {
    let exe = compile("tests/c/node.c");
    let mut command = match wrap {
        Some(wrap) => wrap(&exe),
        None => target_command(&exe),
    };
    command.arg(port.to_string()).arg(node_id(index));
    command.args(key_file);
    let timeout = if wrap.is_some() {
        VALGRIND_TIMEOUT
    } else {
        SYNC_TIMEOUT
    };
    let mut node = Program::spawn(&format!("node {index}"), command, timeout);
    node.expect_line(&format!("ready {}", node_id(index)));
    node
}

fn change(key: &str, origin: &str, value: Option<&str>) -> String {
    format!("change {key} {origin} {}", value.unwrap_or("(deleted)"))
}

#[test]
fn header_is_fresh() {
    let config = cbindgen::Config::from_file(manifest_dir().join("cbindgen.toml"))
        .expect("read cbindgen.toml");
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_src(manifest_dir().join("src/ffi.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut fresh);
    let path = manifest_dir().join("include/gwsync.h");
    if std::env::var_os("GWSYNC_UPDATE_HEADER").is_some_and(|value| value == "1") {
        std::fs::write(&path, &fresh).expect("write include/gwsync.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/gwsync.h differs from what cbindgen generates from src/ffi.rs; \
         regenerate with GWSYNC_UPDATE_HEADER=1 cargo test --test c_api header_is_fresh"
    );
}

#[test]
fn pkg_config_gives_the_link_line() {
    if !common::tool_found("pkg-config") {
        common::skip("pkg-config is not installed (apt-get install pkg-config)");
        return;
    }
    let output = Command::new("pkg-config")
        .env("PKG_CONFIG_PATH", manifest_dir())
        .args([
            "--define-variable=prefix=/opt/gw",
            "--cflags",
            "--libs",
            "gwsync",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let flags = String::from_utf8(output.stdout).unwrap();
    assert!(flags.contains("-I/opt/gw/include"), "{flags}");
    assert!(flags.contains("-L/opt/gw/lib -lgwsync"), "{flags}");
    assert!(flags.contains("-lpthread"), "{flags}");
}

#[test]
fn every_call_returns_its_documented_error() {
    if !can_build_c() {
        return;
    }
    let exe = compile("tests/c/api_contract.c");
    let mut command = target_command(exe);
    let state = TempDir::new("c-api-contract");
    command.arg(unique_port().to_string()).arg(state.path());
    let mut program = Program::spawn("api_contract", command, SYNC_TIMEOUT);
    program.expect("the ok line", |line| line.starts_with("ok: "));
    program.wait();
}

#[test]
fn api_contract_is_clean_under_memcheck() {
    if !can_build_c() || !have_valgrind() {
        return;
    }
    let exe = compile("tests/c/api_contract.c");
    let mut command = memcheck(&exe);
    let state = TempDir::new("c-api-memcheck");
    command.arg(unique_port().to_string()).arg(state.path());
    let mut program = Program::spawn("api_contract under memcheck", command, VALGRIND_TIMEOUT);
    program.expect("the ok line", |line| line.starts_with("ok: "));
    let (_, stderr) = program.wait();
    assert!(!stderr.contains("definitely lost"), "{stderr}");
}

#[test]
fn three_c_processes_converge_and_a_delete_propagates() {
    if !can_build_c() {
        return;
    }
    let port = unique_port();
    let mut nodes: Vec<Program> = (0..3).map(|index| start_node(port, index, None)).collect();
    let value = r#"{"name":"Evening","lights":[1,2],"level":40}"#;

    nodes[0].ask(
        r#"set scene/evening { "name": "Evening", "lights": [1, 2], "level": 40 }"#,
        &["ok set"],
    );
    for node in &mut nodes {
        node.expect_line(&change("scene/evening", &node_id(0), Some(value)));
    }
    for node in &mut nodes {
        assert_eq!(
            node.ask("get scene/evening", &["value", "notfound", "err"]),
            format!("value {value}")
        );
    }

    nodes[2].ask("del scene/evening", &["ok del"]);
    for node in &mut nodes {
        node.expect_line(&change("scene/evening", &node_id(2), None));
    }
    for node in &mut nodes {
        assert_eq!(
            node.ask("get scene/evening", &["value", "notfound", "err"]),
            "notfound"
        );
    }
    for node in nodes {
        node.wait();
    }
}

#[test]
fn keyed_c_processes_sync_and_an_unkeyed_one_learns_nothing() {
    if !can_build_c() {
        return;
    }
    let dir = TempDir::new("c-api-keyed");
    let key_file = dir.path().join("key");
    let key: String = (0..32)
        .map(|byte| format!("{:02x}", byte * 7 + 1))
        .collect();
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let port = unique_port();
    let mut unkeyed = start_node(port, 0, None);
    let mut writer = start_node_keyed(port, 1, None, Some(&key_file));
    let mut reader = start_node_keyed(port, 2, None, Some(&key_file));

    writer.ask(r#"set secret/code 1234"#, &["ok set"]);
    reader.expect_line(&change("secret/code", &node_id(1), Some("1234")));
    // The unkeyed node heard the same push (one loopback, one group) and
    // could not open it.
    assert_eq!(
        unkeyed.ask("get secret/code", &["value", "notfound", "err"]),
        "notfound"
    );
    for node in [unkeyed, writer, reader] {
        let (_, stderr) = node.wait();
        assert!(!stderr.contains("may read the group key"), "{stderr}");
    }
}

#[test]
fn a_node_under_memcheck_syncs_without_leaks() {
    if !can_build_c() || !have_valgrind() {
        return;
    }
    let port = unique_port();
    let mut checked = start_node(port, 0, Some(memcheck));
    let mut plain = start_node(port, 1, None);
    checked.timeout = VALGRIND_TIMEOUT;
    plain.timeout = VALGRIND_TIMEOUT;

    plain.ask(r#"set home/1 {"rooms":["kitchen"]}"#, &["ok set"]);
    checked.expect_line(&change(
        "home/1",
        &node_id(1),
        Some(r#"{"rooms":["kitchen"]}"#),
    ));
    checked.ask(r#"set home/2 "attic""#, &["ok set"]);
    plain.expect_line(&change("home/2", &node_id(0), Some(r#""attic""#)));
    plain.ask("del home/1", &["ok del"]);
    checked.expect_line(&change("home/1", &node_id(1), None));
    assert_eq!(
        checked.ask("get home/2", &["value", "notfound", "err"]),
        r#"value "attic""#
    );
    let (_, stderr) = checked.wait();
    assert!(!stderr.contains("definitely lost"), "{stderr}");
    plain.wait();
}

fn own_id_of_threads() -> String {
    node_id(7)
}

/// Two writer threads and the background thread, against a poll-mode peer.
fn thread_mode(wrap: Option<fn(&Path) -> Command>) {
    let port = unique_port();
    let timeout = if wrap.is_some() {
        VALGRIND_TIMEOUT
    } else {
        SYNC_TIMEOUT
    };
    let mut peer = start_node(port, 1, None);
    peer.timeout = timeout;
    let exe = compile("tests/c/threads.c");
    let mut command = match wrap {
        Some(wrap) => wrap(&exe),
        None => target_command(&exe),
    };
    command.arg(port.to_string()).arg(own_id_of_threads());
    let mut threads = Program::spawn("threads", command, timeout);
    threads.expect_line("written");
    // Every write of both writers reaches the peer, by push or repair.
    let mut missing: HashSet<String> = (0..2)
        .flat_map(|writer| {
            (0..50).map(move |i| {
                change(
                    &format!("t{writer}/{i}"),
                    &own_id_of_threads(),
                    Some(&format!(r#"{{"writer":{writer},"i":{i}}}"#)),
                )
            })
        })
        .collect();
    while !missing.is_empty() {
        let line = peer.expect(&format!("{} more writes", missing.len()), |line| {
            line.starts_with("change t")
        });
        missing.remove(&line);
    }
    peer.ask("set peer/done true", &["ok set"]);
    threads.expect_line("ok");
    let (_, stderr) = threads.wait();
    assert!(!stderr.contains("Possible data race"), "{stderr}");
    peer.wait();
}

#[test]
fn thread_mode_two_writers_while_syncing() {
    if !can_build_c() {
        return;
    }
    thread_mode(None);
}

#[test]
fn thread_mode_is_race_free_under_helgrind() {
    if !can_build_c() || !have_valgrind() {
        return;
    }
    thread_mode(Some(helgrind));
}

#[test]
fn example_gateway_syncs_with_a_node() {
    if !can_build_c() {
        return;
    }
    let port = unique_port();
    let dir = TempDir::new("c-api-example");
    let key_file = common::group_key_file(dir.path());
    let exe = compile("examples/c/gateway.c");
    let mut command = target_command(exe);
    command.args(["lo", &port.to_string()]).arg(&key_file);
    let mut node = start_node_keyed(port, 3, None, Some(&key_file));
    let mut gateway = Program::spawn("gateway", command, SYNC_TIMEOUT);
    gateway.expect("gateway ready", |line| line.starts_with("gateway ready: "));
    let scene = r#"{"name":"Evening","lights":{"ceiling":40,"lamp":80}}"#;
    let line = node.expect("the gateway's scene", |line| {
        line.starts_with("change scene/living-room ") && line.ends_with(scene)
    });
    let gateway_id = line.split(' ').nth(2).unwrap().to_owned();

    node.ask(r#"set light/1 {"on":true}"#, &["ok set"]);
    gateway.expect_line(&format!(
        r#"gateway: light/1 = {{"on":true}} (from {})"#,
        node_id(3)
    ));
    node.ask("del light/1", &["ok del"]);
    gateway.expect_line(&format!("gateway: light/1 deleted (by {})", node_id(3)));

    let pid = nix::unistd::Pid::from_raw(gateway.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    gateway.expect("the final dump", |line| {
        line.starts_with("gateway stopping with ") && line.contains(scene)
    });
    gateway.wait();
    assert_eq!(gateway_id.len(), 16, "{line}");
    node.wait();
}

/// A C program built exactly as the README says after
/// `scripts/install.sh --prefix DIR`: `cc app.c $(pkg-config --cflags --libs
/// gwsync)`. It also checks that the C API refuses a key with a control
/// character, naming it.
const INSTALLED_APP: &str = r#"
#include <stdio.h>
#include <string.h>
#include <gwsync.h>

int main(int argc, char **argv)
{
    char config[512];
    if (argc != 3)
        return 2;
    snprintf(config, sizeof config,
             "{\"interfaces\":[\"lo\"],\"port\":%s,\"key_file\":\"%s\"}", argv[1], argv[2]);
    gwsync_t *g = gwsync_open(config);
    if (!g) {
        fprintf(stderr, "open: %s\n", gwsync_last_error());
        return 1;
    }
    char why[256] = "";
    int bad = gwsync_set(g, "two\nlines", "1");
    /* Valid until the next call on this thread: copied. */
    if (gwsync_last_error())
        snprintf(why, sizeof why, "%s", gwsync_last_error());
    int good = gwsync_set(g, "one/line", "1");
    printf("version %s bad %d good %d why %s\n", gwsync_version(), bad, good, why);
    gwsync_close(g);
    return bad == GWSYNC_ERR_INVALID && good == GWSYNC_OK && strstr(why, "control character") ? 0 : 1;
}
"#;

#[test]
fn install_script_gives_a_prefix_that_pkg_config_and_cc_use() {
    if let Some(triple) = cross_triple() {
        common::skip_on_emulator(&format!(
            "installs for the host's pkg-config and cc, not {triple}"
        ));
        return;
    }
    if !common::tool_found("pkg-config") {
        common::skip("pkg-config is not installed (apt-get install pkg-config)");
        return;
    }
    if !can_build_c() {
        return;
    }
    let dir = common::TempDir::new("c-install");
    let prefix = dir.path().join("prefix");
    let prefix_text = prefix.to_str().unwrap();
    let install = Command::new(manifest_dir().join("scripts/install.sh"))
        .args(["--prefix", prefix_text, "--lib"])
        .arg(staticlib())
        .output()
        .unwrap();
    assert!(install.status.success(), "{install:?}");
    for file in [
        "lib/libgwsync.a",
        "include/gwsync.h",
        "lib/pkgconfig/gwsync.pc",
    ] {
        assert!(prefix.join(file).is_file(), "{file} not installed");
    }
    let app = dir.path().join("app.c");
    std::fs::write(&app, INSTALLED_APP).unwrap();
    let program = dir.path().join("app");
    // The README's command, through a shell, as a user types it.
    let build = Command::new("sh")
        .arg("-c")
        .arg("cc -o \"$2\" \"$1\" $(pkg-config --cflags --libs gwsync)")
        .arg("sh")
        .arg(&app)
        .arg(&program)
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .unwrap();
    assert!(build.status.success(), "{build:?}");
    let key = dir.path().join("key");
    let genkey = common::gwsync(&["genkey"]);
    std::fs::write(&key, genkey.stdout).unwrap();
    let run = Command::new(&program)
        .arg(common::unique_port().to_string())
        .arg(&key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("\"two\\nlines\""),
        "names the key: {stdout}"
    );
}

/// A tmpfs mounted for one test, unmounted on drop even when it fails.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `dir` to the last byte; returns the file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    while file.write_all(&chunk[..1]).is_ok() {}
    path
}

#[test]
fn a_c_write_on_a_full_state_disk_says_not_persisted_and_nothing_acknowledged_is_lost() {
    if !can_build_c() {
        return;
    }
    if !common::is_root() {
        common::skip("mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let dir = TempDir::new("c-api-full-disk");
    let flash = dir.path().join("flash");
    std::fs::create_dir(&flash).unwrap();
    common::run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=256k,mode=0700",
            "gwsync-test",
            flash.to_str().unwrap(),
        ],
    );
    let flash = Tmpfs(flash);
    let state_dir = flash.0.join("gw");
    let mut command = target_command(compile("tests/c/node.c"));
    command
        .env("GWSYNC_TEST_STATE_DIR", &state_dir)
        .arg(unique_port().to_string())
        .arg(node_id(5));
    let mut node = Program::spawn("node 5", command, SYNC_TIMEOUT);
    node.expect_line(&format!("ready {}", node_id(5)));
    node.ask("set before 1", &["ok set", "err"]);

    let filler = fill(&flash.0);
    // Within the debounce window the write is acknowledged before any save
    // is tried; on a slow machine a save may already have failed, and then
    // it must say so. Either way it is kept (checked at the end).
    let during = node.ask("set during 1", &["ok set", "err"]);
    assert!(
        during == "ok set"
            || during.starts_with(&format!("err {} ", gwsync::ffi::GWSYNC_ERR_NOT_PERSISTED)),
        "{during}"
    );
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let refused = loop {
        let answer = node.ask("set refused 1", &["ok set", "err"]);
        if answer.starts_with("err") || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        refused.starts_with(&format!("err {} ", gwsync::ffi::GWSYNC_ERR_NOT_PERSISTED)),
        "{refused}"
    );
    assert!(refused.contains("NOT saved"), "{refused}");

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let answer = node.ask("set after 1", &["ok set", "err"]);
        if answer == "ok set" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "saving never recovered: {answer}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    node.send("quit");
    node.wait();
    let saved = std::fs::read_to_string(state_dir.join("state.json")).unwrap();
    for key in ["before", "during", "refused", "after"] {
        assert!(
            saved.contains(&format!("\"k\":\"{key}\"")),
            "{key}: {saved}"
        );
    }
}
