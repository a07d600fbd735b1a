//! The C ABI: `libgwsync.a` and `include/gwsync.h` (generated from this file
//! by cbindgen; the doc comments below are the header's comments).
//!
//! Conventions (rustls-ffi's, see its README "API Conventions"):
//! - fallible functions return `GWSYNC_OK` (0) or a negative `GWSYNC_ERR_*`
//!   code and set the calling thread's [`gwsync_last_error`];
//! - the handle comes first, inputs next, out-parameters last; an
//!   out-parameter is written only on success;
//! - every string returned to C is freed with [`gwsync_free`];
//! - every entry point runs inside a panic boundary ([`guard`]): a panic
//!   becomes `GWSYNC_ERR_PANIC`, never an unwind into C and never an
//!   abort of the C program: every profile that builds libgwsync.a
//!   (release here, the OpenWrt SDK's) unwinds, so the boundary catches it.
//!
//! The handle wraps one [`Driver`] in a mutex, so every call is safe from
//! any thread. Change events are taken from the driver under the lock and
//! handed to the C callback after the lock is released: a callback may call
//! back into the API without deadlocking.
//!
//! All of the crate's `unsafe` lives in this module.
#![allow(non_camel_case_types)]
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell, UnsafeCell};
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::ops::{Deref, DerefMut};
use std::os::fd::AsFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::config::{Config, ConfigError, ConfigErrorKind};
use crate::control::ErrorCode;
use crate::driver::{ChangeEvent, Driver, DriverConfig, SetError};
use crate::engine::TriggerReason;

/// Success.
pub const GWSYNC_OK: c_int = 0;
/// What `gwsync_timeout_ms` returns when nothing is due at any time: wait
/// for the fd alone. Error codes start below it so they never read as
/// "no deadline".
pub const GWSYNC_NO_DEADLINE: c_int = -1;
/// An argument is wrong: a NULL pointer, text that is not UTF-8, a value or
/// configuration that is not valid JSON, an unknown configuration key or
/// trigger reason, an empty key or one holding a control character.
pub const GWSYNC_ERR_INVALID: c_int = -2;
/// The key holds no value (`gwsync_get`, `gwsync_delete`).
pub const GWSYNC_ERR_NOT_FOUND: c_int = -3;
/// The key or value is longer than the store allows (keys: 256 bytes,
/// values: 65536 bytes of compact JSON, by default).
pub const GWSYNC_ERR_TOO_LARGE: c_int = -4;
/// The store is at its entry or byte limit; delete something first.
pub const GWSYNC_ERR_FULL: c_int = -5;
/// The operating system refused: the state directory cannot be used, the
/// key file cannot be read, a thread or an fd cannot be created.
pub const GWSYNC_ERR_IO: c_int = -6;
/// The handle is in the wrong state for the call: shut down
/// (`gwsync_shutdown`), in thread mode for a poll-mode call, already in
/// thread mode, or the call is not allowed from inside a change callback.
pub const GWSYNC_ERR_STATE: c_int = -7;
/// gwsync hit an internal error (a Rust panic, caught at the boundary).
/// When it struck while the handle was in use, every later call on that
/// handle returns this code too; `gwsync_close` still frees it.
pub const GWSYNC_ERR_PANIC: c_int = -8;
/// The write was applied and sent to the other gateways, but the state
/// directory cannot be written (full or read-only flash): it is lost at a
/// restart unless saving recovers first. `gwsync_last_error` says why;
/// `gwsync_status` shows `"persist": {"ok": false, ...}` meanwhile.
pub const GWSYNC_ERR_NOT_PERSISTED: c_int = -9;

/// `gwsync_trigger` reason: the devices this gateway manages powered on.
pub const GWSYNC_TRIGGER_POWER_ON: c_int = 1;
/// `gwsync_trigger` reason: the devices reconnected.
pub const GWSYNC_TRIGGER_RECONNECT: c_int = 2;
/// `gwsync_trigger` reason: the network (re)initialised. Also rebuilds the
/// multicast socket and re-joins the group.
pub const GWSYNC_TRIGGER_NETWORK_UP: c_int = 3;
/// `gwsync_trigger` reason: asked for by an operator or a script.
pub const GWSYNC_TRIGGER_MANUAL: c_int = 4;

/// Change callback: an entry changed, by a write on this handle or from
/// another gateway.
///
/// - `user`: the pointer given to `gwsync_on_change`, passed back as is.
/// - `key`: the key, NUL-terminated UTF-8.
/// - `value_json`: the new value as compact JSON text, or NULL when the key
///   was deleted.
/// - `origin`: the node id of the gateway that wrote the change, as 16
///   lower-case hex digits (the form of the `node_id` config key and of
///   `gwsync status`).
///
/// All three strings are borrowed: valid only until the callback returns;
/// copy what you keep. Do not free them.
///
/// Runs in poll mode on the thread that called `gwsync_process`, in thread
/// mode on gwsync's background thread; never while gwsync holds a lock.
/// From inside the callback these are safe: `gwsync_set`, `gwsync_get`,
/// `gwsync_delete`, `gwsync_dump`, `gwsync_list`, `gwsync_status`,
/// `gwsync_trigger`, `gwsync_on_change`, `gwsync_fd`, `gwsync_timeout_ms`,
/// `gwsync_free`, `gwsync_last_error`, `gwsync_version`. These return
/// `GWSYNC_ERR_STATE` and do nothing: `gwsync_process`,
/// `gwsync_start_thread`, `gwsync_shutdown`; `gwsync_close` is refused
/// (the handle stays open, `gwsync_last_error` says why). The callback
/// must return (no longjmp, no C++ exception).
pub type gwsync_change_cb = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        key: *const c_char,
        value_json: *const c_char,
        origin: *const c_char,
    ),
>;

/// One gateway: an opaque handle from `gwsync_open`, freed by
/// `gwsync_close`. Calls on one handle lock it, so they are safe from any
/// thread in both modes; in poll mode the change callback runs only
/// inside `gwsync_process`, and a write from another thread is pushed at
/// the loop's next `gwsync_process`.
pub struct gwsync_t {
    shared: Arc<Shared>,
}

/// What the caller's threads and the background thread share.
struct Shared {
    core: Lock<Core>,
    /// Separate from `core` so a callback can be replaced while the
    /// background thread delivers events, and read without `core`'s lock.
    callback: Lock<Callback>,
    /// Wakes the background thread when a call changed its deadline (a
    /// write to push) or it must stop.
    wake: EventFd,
}

struct Core {
    /// `None` once shut down.
    driver: Option<Driver>,
    /// Events may be waiting in the driver's queue (a local write or a
    /// trigger made some): `gwsync_timeout_ms` says "now" until
    /// `gwsync_process` delivered them.
    undelivered: bool,
    thread: Option<JoinHandle<()>>,
    threaded: bool,
    stopping: bool,
    /// The background thread panicked; the driver's state is unknown.
    broken: bool,
}

#[derive(Clone, Copy)]
struct Callback {
    function: gwsync_change_cb,
    user: UserData,
}

/// The caller's `user` pointer. gwsync never dereferences it.
#[derive(Clone, Copy)]
struct UserData(*mut c_void);

// SAFETY: the pointer is only handed back to the caller's callback. In
// thread mode that happens on the background thread, which the header
// documents: making `user` usable there is the caller's side of the
// contract, as with any C library that calls back from its own thread.
unsafe impl Send for UserData {}

// The driver moves to the background thread in thread mode.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Driver>();
};

/// A mutex on `pthread_mutex_t` rather than std's futex-based one, so that
/// valgrind's helgrind and DRD see the handle's locking and can check
/// thread mode for races (with std's mutex they report every access as
/// unprotected). Poisons like std's: a panic while held marks it.
struct Lock<T> {
    /// Boxed: a pthread mutex must not move once in use.
    raw: Box<UnsafeCell<libc::pthread_mutex_t>>,
    /// Written only while locked.
    poisoned: UnsafeCell<bool>,
    value: UnsafeCell<T>,
}

// SAFETY: `value` and `poisoned` are only reached through a Guard, which
// exists only while this thread holds `raw`, as with std's Mutex.
unsafe impl<T: Send> Sync for Lock<T> {}
// SAFETY: as above; moving the lock moves the value with it.
unsafe impl<T: Send> Send for Lock<T> {}

impl<T> Lock<T> {
    fn new(value: T) -> Lock<T> {
        Lock {
            raw: Box::new(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER)),
            poisoned: UnsafeCell::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Err when a panic happened while it was held.
    fn lock(&self) -> Result<Guard<'_, T>, ()> {
        let guard = self.lock_even_poisoned();
        // SAFETY: read while holding the lock.
        if unsafe { *self.poisoned.get() } {
            Err(())
        } else {
            Ok(guard)
        }
    }

    fn lock_even_poisoned(&self) -> Guard<'_, T> {
        // SAFETY: `raw` is an initialised default mutex that never moves.
        // A default mutex locked twice by one thread deadlocks rather than
        // erroring; the callback rules keep gwsync from doing that.
        let rc = unsafe { libc::pthread_mutex_lock(self.raw.get()) };
        assert_eq!(rc, 0, "pthread_mutex_lock");
        Guard { lock: self }
    }
}

impl<T> Drop for Lock<T> {
    fn drop(&mut self) {
        // SAFETY: not locked: no Guard outlives the borrow of `self`.
        unsafe { libc::pthread_mutex_destroy(self.raw.get()) };
    }
}

struct Guard<'a, T> {
    lock: &'a Lock<T>,
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this thread holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this thread holds the lock.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: this thread holds the lock.
            unsafe { *self.lock.poisoned.get() = true };
        }
        // SAFETY: locked by this thread in lock_even_poisoned.
        unsafe { libc::pthread_mutex_unlock(self.lock.raw.get()) };
    }
}

/// An error for C: a code and the message for `gwsync_last_error`.
#[derive(Debug)]
struct Error {
    code: c_int,
    message: String,
}

fn error(code: c_int, message: impl Into<String>) -> Error {
    Error {
        code,
        message: message.into(),
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
    /// Set while this thread runs a change callback.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

fn set_last_error(message: &str) {
    // A message with a NUL in it (from a path, say) is cut there rather
    // than lost.
    let text = message.split('\0').next().unwrap_or_default();
    let text = CString::new(text).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|last| {
        if let Ok(mut last) = last.try_borrow_mut() {
            *last = text;
        }
    });
}

fn clear_last_error() {
    let _ = LAST_ERROR.try_with(|last| {
        if let Ok(mut last) = last.try_borrow_mut() {
            if !last.as_bytes().is_empty() {
                *last = CString::default();
            }
        }
    });
}

/// What an entry point returns when it failed.
trait FfiReturn {
    fn from_error(code: c_int) -> Self;
}

impl FfiReturn for c_int {
    fn from_error(code: c_int) -> Self {
        code
    }
}

impl<T> FfiReturn for *mut T {
    fn from_error(_code: c_int) -> Self {
        std::ptr::null_mut()
    }
}

impl<T> FfiReturn for *const T {
    fn from_error(_code: c_int) -> Self {
        std::ptr::null()
    }
}

impl FfiReturn for () {
    fn from_error(_code: c_int) -> Self {}
}

/// The panic boundary every entry point runs in. Clears the thread's last
/// error on success and sets it on failure, so `gwsync_last_error` always
/// describes the latest call.
fn guard<T: FfiReturn>(body: impl FnOnce() -> Result<T, Error>) -> T {
    guard_keeping_error(|| {
        let value = body()?;
        clear_last_error();
        Ok(value)
    })
}

/// The panic boundary for the calls that must not clear the last error on
/// success (`gwsync_last_error` itself, `gwsync_version`, `gwsync_free`).
fn guard_keeping_error<T: FfiReturn>(body: impl FnOnce() -> Result<T, Error>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => value,
        Ok(Err(error)) => {
            set_last_error(&error.message);
            T::from_error(error.code)
        }
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            set_last_error(&format!("gwsync internal error: {message}"));
            T::from_error(GWSYNC_ERR_PANIC)
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "panic"
    }
}

/// # Safety
/// `g` is NULL or a live handle from `gwsync_open`.
unsafe fn handle<'a>(g: *const gwsync_t) -> Result<&'a gwsync_t, Error> {
    // SAFETY: the caller guarantees a non-NULL `g` is live.
    unsafe { g.as_ref() }.ok_or_else(|| error(GWSYNC_ERR_INVALID, "handle is NULL"))
}

/// # Safety
/// `text` is NULL or a NUL-terminated string that outlives `'a`.
unsafe fn text<'a>(text: *const c_char, what: &str) -> Result<&'a str, Error> {
    if text.is_null() {
        return Err(error(GWSYNC_ERR_INVALID, format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(text) };
    bytes
        .to_str()
        .map_err(|_| error(GWSYNC_ERR_INVALID, format!("{what} is not valid UTF-8")))
}

fn check_out<T>(out: *mut T, what: &str) -> Result<(), Error> {
    if out.is_null() {
        Err(error(GWSYNC_ERR_INVALID, format!("{what} is NULL")))
    } else {
        Ok(())
    }
}

/// Makes a C string the caller frees with `gwsync_free`. JSON text never
/// holds a NUL byte; a stored value from a misbehaving peer might, and is
/// then handed out as a JSON string so the C side still gets all of it.
fn c_string(text: String) -> CString {
    CString::new(text).unwrap_or_else(|error| {
        let text = String::from_utf8_lossy(&error.into_vec()).into_owned();
        let quoted = serde_json::Value::from(text).to_string();
        CString::new(quoted).expect("serde_json escapes NUL")
    })
}

/// # Safety
/// `out` is non-NULL (checked by [`check_out`]) and writable.
unsafe fn give(out: *mut *mut c_char, text: String) {
    // SAFETY: the caller's contract.
    unsafe { *out = c_string(text).into_raw() };
}

fn in_callback() -> bool {
    IN_CALLBACK.try_with(Cell::get).unwrap_or(false)
}

fn refuse_in_callback(what: &str) -> Result<(), Error> {
    if in_callback() {
        Err(error(
            GWSYNC_ERR_STATE,
            format!("{what} may not be called from a change callback"),
        ))
    } else {
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> Result<Guard<'_, Core>, Error> {
        let core = self
            .core
            .lock()
            .map_err(|_| error(GWSYNC_ERR_PANIC, "handle unusable after an internal error"))?;
        if core.broken {
            return Err(error(
                GWSYNC_ERR_PANIC,
                "handle unusable after an internal error in its background thread",
            ));
        }
        Ok(core)
    }

    /// Runs a call that may make change events or move the deadline
    /// closer (a write to push): poll mode learns it from
    /// `gwsync_timeout_ms` saying 0, the background thread from a wake.
    fn change(&self, call: impl FnOnce(&mut Driver) -> Result<(), Error>) -> Result<(), Error> {
        let mut core = self.lock()?;
        call(core.driver()?)?;
        core.undelivered = true;
        let threaded = core.threaded;
        drop(core);
        if threaded {
            self.wake();
        }
        Ok(())
    }

    fn wake(&self) {
        // A full counter (2^64 - 2 wakes unread) still wakes the reader.
        let _ = self.wake.write(1);
    }

    fn callback(&self) -> Callback {
        *self.callback.lock_even_poisoned()
    }

    /// Hands events to the C callback, with no lock held.
    fn deliver(&self, events: Vec<ChangeEvent>) {
        for event in events {
            // Read per event: a callback may replace itself.
            let Callback {
                function: Some(function),
                user,
            } = self.callback()
            else {
                continue;
            };
            let Ok(key) = CString::new(event.key) else {
                // A peer's key with a NUL in it: C cannot name it anyway.
                log::warn!("change of a key holding a NUL byte not passed to C");
                continue;
            };
            let value = event.value.map(c_string);
            let origin = c_string(event.origin.to_string());
            IN_CALLBACK.with(|flag| flag.set(true));
            // SAFETY: `function` is the caller's callback with the
            // documented signature; the strings live until it returns.
            unsafe {
                function(
                    user.0,
                    key.as_ptr(),
                    value
                        .as_ref()
                        .map_or(std::ptr::null(), |value| value.as_ptr()),
                    origin.as_ptr(),
                )
            };
            IN_CALLBACK.with(|flag| flag.set(false));
        }
    }
}

impl Core {
    fn driver(&mut self) -> Result<&mut Driver, Error> {
        self.driver
            .as_mut()
            .ok_or_else(|| error(GWSYNC_ERR_STATE, "handle is shut down"))
    }

    fn poll_mode(&mut self, what: &str) -> Result<&mut Driver, Error> {
        if self.threaded {
            return Err(error(
                GWSYNC_ERR_STATE,
                format!("{what} is for poll mode; this handle runs its own thread"),
            ));
        }
        self.driver()
    }

    fn take_events(&mut self) -> Vec<ChangeEvent> {
        self.undelivered = false;
        let Some(driver) = &mut self.driver else {
            return Vec::new();
        };
        std::iter::from_fn(|| driver.poll_change()).collect()
    }

    /// Milliseconds until `gwsync_process` is due, or GWSYNC_NO_DEADLINE.
    fn timeout_ms(&self) -> Result<c_int, Error> {
        let driver = self
            .driver
            .as_ref()
            .ok_or_else(|| error(GWSYNC_ERR_STATE, "handle is shut down"))?;
        if self.undelivered {
            return Ok(0);
        }
        Ok(match driver.timeout_ms() {
            Some(ms) => c_int::try_from(ms).unwrap_or(c_int::MAX),
            None => GWSYNC_NO_DEADLINE,
        })
    }
}

fn driver_config(json: &str) -> Result<(DriverConfig, log::LevelFilter), Error> {
    let config_error = |failure: ConfigError| {
        let code = match failure.kind {
            ConfigErrorKind::Invalid => GWSYNC_ERR_INVALID,
            ConfigErrorKind::Io => GWSYNC_ERR_IO,
        };
        error(code, failure.message)
    };
    let config = Config::from_json(json).map_err(config_error)?;
    // The level first, so a warning about the key file is shown.
    crate::logging::log_to_stderr(config.log_level);
    let driver = config.driver_config().map_err(|failure| {
        let message = failure.message.clone();
        let failure = config_error(failure);
        error(failure.code, format!("config: {message}"))
    })?;
    Ok((driver, config.log_level))
}

/// The C code of a protocol error code: the one mapping of write errors
/// (see `control::ErrorCode`), seen from C.
fn c_code(code: ErrorCode) -> c_int {
    match code {
        ErrorCode::NotFound => GWSYNC_ERR_NOT_FOUND,
        ErrorCode::InvalidJson | ErrorCode::BadRequest => GWSYNC_ERR_INVALID,
        // Empty keys are refused before the engine sees them.
        ErrorCode::InvalidKey | ErrorCode::TooLarge => GWSYNC_ERR_TOO_LARGE,
        ErrorCode::StoreFull => GWSYNC_ERR_FULL,
        ErrorCode::NotPersisted => GWSYNC_ERR_NOT_PERSISTED,
        ErrorCode::ReloadFailed => GWSYNC_ERR_IO,
        // No write can be newer than the stored version: a state, not an
        // argument, problem.
        ErrorCode::VersionExhausted => GWSYNC_ERR_STATE,
    }
}

fn write_result(
    driver: &Driver,
    key: &str,
    value: &str,
    result: Result<(), SetError>,
) -> Result<(), Error> {
    result.map_err(|failure| {
        let code = match ErrorCode::from(&failure) {
            // A key with a control character is wrong, not too large.
            ErrorCode::InvalidKey if key.len() <= driver.engine().config().store.key_bytes_max => {
                GWSYNC_ERR_INVALID
            }
            code => c_code(code),
        };
        error(code, driver.explain(key, value, &failure))
    })
}

fn non_empty_key(key: &str) -> Result<&str, Error> {
    if key.is_empty() {
        Err(error(GWSYNC_ERR_INVALID, "key is empty"))
    } else {
        Ok(key)
    }
}

/// Opens a gateway: loads the state (when `state_dir` is set), opens the
/// multicast socket, joins the group and starts a sync request.
///
/// `config_json` (borrowed, may be freed after the call) is a JSON object;
/// every key is optional and mirrors a daemon flag:
/// - "interfaces": ["br-lan", ...]; default: the kernel's choice;
/// - "group": IPv4 or IPv6 multicast address; default "239.255.73.73";
/// - "port": UDP port; default 7373;
/// - "state_dir": where the node id and data persist (debounced atomic
///   writes); default: none, everything is kept in memory only;
/// - "key_file": file with the group key (`gwsync genkey`), or two keys one
///   per line during a rotation: the first is sent with, both are accepted;
/// - "keys": the same, inline: ["<64 hex digits>", ...] (1 or 2 keys);
/// - "open": true runs without a key: every host on the LAN can then read
///   and change every value. Exactly one of "key_file", "keys" and
///   "open": true must be given: a handle without a key is refused;
/// - "node_id": up to 16 hex digits; default: the persisted one, or random;
/// - "log_level": "off", "error", "warn", "info", "debug" or "trace";
///   default "warn". Logs go to stderr; the level is process-wide;
/// - "max_entries": entries the store holds at most, tombstones included;
///   default 100000;
/// - "max_store_bytes": bytes of keys and values the store holds at most;
///   default 16777216 (16 MiB);
/// - "tombstone_lifetime_s": seconds a delete is remembered, so an older
///   copy cannot bring the key back; default 604800 (7 days).
///
/// Interfaces that do not exist yet are not an error: they are joined when
/// they appear. Returns a handle owned by the caller (free it with
/// `gwsync_close`), or NULL with `gwsync_last_error()` set: config_json
/// NULL, not UTF-8, not JSON, an unknown or repeated key, a bad value or
/// no key and no "open": true (GWSYNC_ERR_INVALID), the state directory or
/// key file unusable (GWSYNC_ERR_IO).
///
/// The handle starts in poll mode: nothing runs until `gwsync_process`.
///
/// # Safety
/// `config_json` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_open(config_json: *const c_char) -> *mut gwsync_t {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let json = unsafe { text(config_json, "config_json") }?;
        let (config, _level) = driver_config(json)?;
        let driver = Driver::open(config).map_err(|e| error(GWSYNC_ERR_IO, e.to_string()))?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| error(GWSYNC_ERR_IO, format!("eventfd: {e}")))?;
        let shared = Arc::new(Shared {
            core: Lock::new(Core {
                driver: Some(driver),
                // The power-on sync request may already have changes.
                undelivered: true,
                thread: None,
                threaded: false,
                stopping: false,
                broken: false,
            }),
            callback: Lock::new(Callback {
                function: None,
                user: UserData(std::ptr::null_mut()),
            }),
            wake,
        });
        Ok(Box::into_raw(Box::new(gwsync_t { shared })))
    })
}

fn shutdown(g: &gwsync_t) -> Result<(), Error> {
    refuse_in_callback("gwsync_shutdown")?;
    let thread = {
        // A handle broken by a panic is still shut down, for gwsync_close.
        let mut core = g.shared.core.lock_even_poisoned();
        core.stopping = true;
        core.thread.take()
    };
    if let Some(thread) = thread {
        g.shared.wake();
        // The thread catches its own panics; an Err here has nothing left
        // to report.
        let _ = thread.join();
    }
    let mut core = g.shared.core.lock_even_poisoned();
    // Dropping the driver flushes pending state to the state directory.
    drop(core.driver.take());
    Ok(())
}

/// Stops the handle without freeing it: stops the background thread (if
/// any, waiting for a running callback to return), writes pending state to the state directory and
/// closes the socket. Afterwards every call on the handle returns
/// GWSYNC_ERR_STATE, which is what lets other threads that may still hold
/// the pointer fail cleanly; free it with `gwsync_close` once they are
/// done. Calling it again is harmless.
///
/// Returns GWSYNC_OK; GWSYNC_ERR_INVALID when `g` is NULL;
/// GWSYNC_ERR_STATE from inside a change callback (nothing is done).
///
/// # Safety
/// `g` is NULL or a live handle from `gwsync_open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_shutdown(g: *mut gwsync_t) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        shutdown(unsafe { handle(g) }?)?;
        Ok(GWSYNC_OK)
    })
}

/// Shuts the handle down as `gwsync_shutdown` does (stopping the thread,
/// flushing state) and frees it. `g` is invalid afterwards: no other
/// thread may use it, as with free(). NULL is a no-op.
///
/// From inside a change callback the call is refused: the handle stays
/// open and `gwsync_last_error()` says why.
///
/// # Safety
/// `g` is NULL or a live handle from `gwsync_open` that no other thread
/// is using, and is not used after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_close(g: *mut gwsync_t) {
    guard(|| {
        if g.is_null() {
            return Ok(());
        }
        // SAFETY: non-NULL, live by the caller's contract.
        shutdown(unsafe { &*g })?;
        // SAFETY: from Box::into_raw in gwsync_open; the caller gives it up.
        drop(unsafe { Box::from_raw(g) });
        Ok(())
    })
}

/// Writes `value_json` (one JSON value, stored compact) under `key` and
/// pushes it to the group; the change callback sees it too (from the next
/// `gwsync_process` in poll mode, or the background thread).
///
/// `key` and `value_json` are borrowed for the call. A lone write's push
/// leaves within this call; a write within 2 ms of the last push waits to
/// leave with the writes after it: in poll mode, call `gwsync_timeout_ms`
/// again afterwards.
///
/// Returns GWSYNC_OK; GWSYNC_ERR_INVALID: a NULL argument, not UTF-8,
/// an empty key or a value that is not JSON; GWSYNC_ERR_TOO_LARGE: key or
/// value over the limit; GWSYNC_ERR_FULL: the store is full;
/// GWSYNC_ERR_STATE: the handle is shut down.
///
/// # Safety
/// `g` is NULL or a live handle; `key` and `value_json` are NULL or
/// NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_set(
    g: *mut gwsync_t,
    key: *const c_char,
    value_json: *const c_char,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let (g, key, value) = unsafe {
            (
                handle(g)?,
                text(key, "key")?,
                text(value_json, "value_json")?,
            )
        };
        let key = non_empty_key(key)?;
        g.shared.change(|driver| {
            let result = driver.set(key, value);
            write_result(driver, key, value, result)
        })?;
        Ok(GWSYNC_OK)
    })
}

/// Reads the value of `key` as compact JSON text into `*value_json_out`:
/// a new string the caller owns and frees with `gwsync_free`. Written only
/// on success.
///
/// Returns GWSYNC_OK; GWSYNC_ERR_NOT_FOUND: the key holds no value (so
/// also for a key over the length limit); GWSYNC_ERR_INVALID: a NULL
/// argument, a key that is not UTF-8 or empty; GWSYNC_ERR_STATE: the
/// handle is shut down.
///
/// # Safety
/// `g` is NULL or a live handle; `key` is NULL or a NUL-terminated
/// string; `value_json_out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_get(
    g: *const gwsync_t,
    key: *const c_char,
    value_json_out: *mut *mut c_char,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let (g, key) = unsafe { (handle(g)?, text(key, "key")?) };
        check_out(value_json_out, "value_json_out")?;
        let key = non_empty_key(key)?;
        let value = g
            .shared
            .lock()?
            .driver()?
            .get(key)
            .ok_or_else(|| error(GWSYNC_ERR_NOT_FOUND, format!("no value for key {key}")))?;
        // SAFETY: checked non-NULL above; writable by contract.
        unsafe { give(value_json_out, value) };
        Ok(GWSYNC_OK)
    })
}

/// Deletes `key` on every gateway (a tombstone: an older copy cannot bring
/// it back). `key` is borrowed for the call.
///
/// Returns GWSYNC_OK; GWSYNC_ERR_NOT_FOUND: the key holds no value (so
/// also for a key over the length limit); GWSYNC_ERR_INVALID: a NULL
/// argument, a key that is not UTF-8 or empty; GWSYNC_ERR_STATE: shut
/// down.
///
/// # Safety
/// `g` is NULL or a live handle; `key` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_delete(g: *mut gwsync_t, key: *const c_char) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let (g, key) = unsafe { (handle(g)?, text(key, "key")?) };
        let key = non_empty_key(key)?;
        g.shared.change(|driver| {
            let result = driver.delete(key);
            write_result(driver, key, "", result)
        })?;
        Ok(GWSYNC_OK)
    })
}

/// Every key holding a value, as one JSON object `{"key": value, ...}`
/// with the keys sorted, into `*json_out`: a new string the caller frees
/// with `gwsync_free`. Written only on success.
///
/// Returns GWSYNC_OK; GWSYNC_ERR_INVALID: a NULL argument;
/// GWSYNC_ERR_STATE: shut down.
///
/// # Safety
/// `g` is NULL or a live handle; `json_out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_dump(g: *const gwsync_t, json_out: *mut *mut c_char) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let g = unsafe { handle(g) }?;
        check_out(json_out, "json_out")?;
        let dump = g.shared.lock()?.driver()?.dump();
        // SAFETY: checked non-NULL above; writable by contract.
        unsafe { give(json_out, dump) };
        Ok(GWSYNC_OK)
    })
}

/// The keys holding a value that start with `prefix` ("" for all), as a
/// sorted JSON array of strings, into `*json_out`: a new string the caller
/// frees with `gwsync_free`. Written only on success. `prefix` is
/// borrowed for the call.
///
/// Returns GWSYNC_OK; GWSYNC_ERR_INVALID: a NULL argument or a prefix that
/// is not UTF-8; GWSYNC_ERR_STATE: shut down.
///
/// # Safety
/// `g` is NULL or a live handle; `prefix` is NULL or a NUL-terminated
/// string; `json_out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_list(
    g: *const gwsync_t,
    prefix: *const c_char,
    json_out: *mut *mut c_char,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let (g, prefix) = unsafe { (handle(g)?, text(prefix, "prefix")?) };
        check_out(json_out, "json_out")?;
        let keys = g.shared.lock()?.driver()?.list(prefix);
        // SAFETY: checked non-NULL above; writable by contract.
        unsafe { give(json_out, serde_json::Value::from(keys).to_string()) };
        Ok(GWSYNC_OK)
    })
}

/// What `gwsync status` prints, as a JSON object (node_id, peers heard,
/// digest, entry count, counters), into `*json_out`: a new string the
/// caller frees with `gwsync_free`. Written only on success.
///
/// Returns GWSYNC_OK; GWSYNC_ERR_INVALID: a NULL argument;
/// GWSYNC_ERR_STATE: shut down.
///
/// # Safety
/// `g` is NULL or a live handle; `json_out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_status(g: *const gwsync_t, json_out: *mut *mut c_char) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let g = unsafe { handle(g) }?;
        check_out(json_out, "json_out")?;
        let status = g.shared.lock()?.driver()?.status().to_json();
        // SAFETY: checked non-NULL above; writable by contract.
        unsafe { give(json_out, status) };
        Ok(GWSYNC_OK)
    })
}

/// Starts a sync request now (method step 5): call it when the devices
/// this gateway manages power on or reconnect, or the network comes up.
/// `reason` is one of GWSYNC_TRIGGER_*.
///
/// Returns GWSYNC_OK; GWSYNC_ERR_INVALID: `g` NULL or an unknown reason;
/// GWSYNC_ERR_STATE: shut down.
///
/// # Safety
/// `g` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_trigger(g: *mut gwsync_t, reason: c_int) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let g = unsafe { handle(g) }?;
        let reason = match reason {
            GWSYNC_TRIGGER_POWER_ON => TriggerReason::PowerOn,
            GWSYNC_TRIGGER_RECONNECT => TriggerReason::Reconnect,
            GWSYNC_TRIGGER_NETWORK_UP => TriggerReason::NetworkUp,
            GWSYNC_TRIGGER_MANUAL => TriggerReason::Manual,
            other => {
                return Err(error(
                    GWSYNC_ERR_INVALID,
                    format!("unknown trigger reason {other}"),
                ));
            }
        };
        g.shared.change(|driver| {
            driver.trigger(reason);
            Ok(())
        })?;
        Ok(GWSYNC_OK)
    })
}

/// Sets the change callback (see `gwsync_change_cb`), replacing any
/// earlier one; `cb` NULL removes it. Changes that happen while no
/// callback is set are not kept. `user` is passed to every call of `cb`
/// and never dereferenced by gwsync; it must stay valid until the callback
/// is replaced or the handle closed. Set it before the first
/// `gwsync_process` or `gwsync_start_thread` to see every change.
///
/// Returns GWSYNC_OK; GWSYNC_ERR_INVALID: `g` NULL; GWSYNC_ERR_STATE:
/// shut down.
///
/// # Safety
/// `g` is NULL or a live handle; `cb` is NULL or a function with the
/// `gwsync_change_cb` signature; in thread mode `user` must be usable from
/// the background thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_on_change(
    g: *mut gwsync_t,
    cb: gwsync_change_cb,
    user: *mut c_void,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let g = unsafe { handle(g) }?;
        g.shared.lock()?.driver()?;
        let mut callback = g.shared.callback.lock_even_poisoned();
        *callback = Callback {
            function: cb,
            user: UserData(user),
        };
        Ok(GWSYNC_OK)
    })
}

/// Poll mode: the one fd to wait on for readable (poll, epoll, select,
/// libubox uloop). It stays the same fd for the handle's life, however
/// often the socket is rebuilt, so register it once. Owned by the handle:
/// do not close it or read from it.
///
/// Returns the fd (>= 0); GWSYNC_ERR_INVALID: `g` NULL;
/// GWSYNC_ERR_STATE: shut down, or in thread mode.
///
/// # Safety
/// `g` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_fd(g: *const gwsync_t) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let g = unsafe { handle(g) }?;
        Ok(g.shared.lock()?.poll_mode("gwsync_fd")?.fd())
    })
}

/// Poll mode: how long to wait for the fd before calling `gwsync_process`
/// anyway, in milliseconds; 0 when something is due now. Call it again
/// after every gwsync call: writes and triggers bring the deadline closer.
///
/// Returns the timeout (>= 0) or GWSYNC_NO_DEADLINE (-1: wait for the fd
/// alone); GWSYNC_ERR_INVALID: `g` NULL; GWSYNC_ERR_STATE: shut down, or in
/// thread mode. Error codes are all below -1.
///
/// # Safety
/// `g` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_timeout_ms(g: *const gwsync_t) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let g = unsafe { handle(g) }?;
        let mut core = g.shared.lock()?;
        core.poll_mode("gwsync_timeout_ms")?;
        core.timeout_ms()
    })
}

/// Poll mode: does everything that is ready, without blocking: receives
/// datagrams, runs due timers, sends, writes state when due, then calls the
/// change callback for each change, on this thread, with no lock held.
/// Call it when the fd is readable or the timeout passed; a spurious call
/// is harmless.
///
/// Returns GWSYNC_OK; GWSYNC_ERR_INVALID: `g` NULL; GWSYNC_ERR_STATE: shut
/// down, in thread mode, or called from a change callback.
///
/// # Safety
/// `g` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_process(g: *mut gwsync_t) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let g = unsafe { handle(g) }?;
        refuse_in_callback("gwsync_process")?;
        let events = {
            let mut core = g.shared.lock()?;
            core.poll_mode("gwsync_process")?.process();
            core.take_events()
        };
        g.shared.deliver(events);
        Ok(GWSYNC_OK)
    })
}

/// Switches to thread mode: starts a background thread that runs the poll
/// loop. From then on every call is safe from any thread, change callbacks
/// run on the background thread, and `gwsync_fd`, `gwsync_timeout_ms` and
/// `gwsync_process` return GWSYNC_ERR_STATE. The thread stops in
/// `gwsync_shutdown` or `gwsync_close`. There is no way back to poll mode.
///
/// Returns GWSYNC_OK; GWSYNC_ERR_INVALID: `g` NULL; GWSYNC_ERR_STATE:
/// already in thread mode, shut down, or called from a change callback;
/// GWSYNC_ERR_IO: the thread could not be created.
///
/// # Safety
/// `g` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_start_thread(g: *mut gwsync_t) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let g = unsafe { handle(g) }?;
        refuse_in_callback("gwsync_start_thread")?;
        let mut core = g.shared.lock()?;
        core.poll_mode("gwsync_start_thread")?;
        let shared = Arc::clone(&g.shared);
        let thread = std::thread::Builder::new()
            .name("gwsync".into())
            .spawn(move || background(&shared))
            .map_err(|e| error(GWSYNC_ERR_IO, format!("cannot start the thread: {e}")))?;
        core.thread = Some(thread);
        core.threaded = true;
        Ok(GWSYNC_OK)
    })
}

/// The thread mode loop: wait for the driver's fd, the wake fd or the
/// deadline; process; deliver events with no lock held.
fn background(shared: &Shared) {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        loop {
            let (fd, timeout) = {
                let Ok(mut core) = shared.lock() else { return };
                if core.stopping {
                    return;
                }
                let Ok(driver) = core.driver() else { return };
                let fd = driver.fd();
                let Ok(timeout) = core.timeout_ms() else {
                    return;
                };
                (fd, timeout)
            };
            // SAFETY: the driver's fd stays open until the driver is
            // dropped, which shutdown() does only after joining this thread.
            let driver_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let mut fds = [
                PollFd::new(driver_fd, PollFlags::POLLIN),
                PollFd::new(shared.wake.as_fd(), PollFlags::POLLIN),
            ];
            let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::NONE);
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(errno) => {
                    log::error!("background thread: poll failed: {errno}");
                    return;
                }
            }
            if fds[1].any().unwrap_or(false) {
                let _ = shared.wake.read();
            }
            let events = {
                let Ok(mut core) = shared.lock() else { return };
                if core.stopping {
                    return;
                }
                let Ok(driver) = core.driver() else { return };
                driver.process();
                core.take_events()
            };
            shared.deliver(events);
        }
    }));
    if outcome.is_err() {
        log::error!("gwsync background thread stopped by an internal error");
        let mut core = shared.core.lock_even_poisoned();
        core.broken = true;
    }
}

/// Frees a string that gwsync returned through an out-parameter
/// (`gwsync_get`, `gwsync_dump`, `gwsync_list`, `gwsync_status`). NULL is
/// a no-op. Never pass it anything else (not the strings of a change
/// callback, `gwsync_last_error` or `gwsync_version`).
///
/// # Safety
/// `s` is NULL or a string from a gwsync out-parameter, not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gwsync_free(s: *mut c_char) {
    guard_keeping_error(|| {
        if !s.is_null() {
            // SAFETY: from CString::into_raw in give(), by the contract.
            drop(unsafe { CString::from_raw(s) });
        }
        Ok(())
    })
}

/// The message of this thread's latest failed gwsync call; "" when the
/// latest call succeeded (every call except gwsync_last_error,
/// gwsync_version and gwsync_free updates it). Never NULL. Owned by
/// gwsync: valid until this thread's next gwsync call; do not free it.
#[unsafe(no_mangle)]
pub extern "C" fn gwsync_last_error() -> *const c_char {
    static EMPTY: &CStr = c"";
    guard_keeping_error(|| {
        Ok(LAST_ERROR
            .try_with(|last| last.try_borrow().map(|last| last.as_ptr()).ok())
            .ok()
            .flatten()
            .unwrap_or(EMPTY.as_ptr()))
    })
}

/// The library version, e.g. "0.1.0". Static: never free it.
#[unsafe(no_mangle)]
pub extern "C" fn gwsync_version() -> *const c_char {
    static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    guard_keeping_error(|| Ok(VERSION.as_ptr().cast()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::NodeId;
    use std::net::IpAddr;

    fn last_error() -> String {
        // SAFETY: gwsync_last_error never returns NULL.
        unsafe { CStr::from_ptr(gwsync_last_error()) }
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn a_panic_becomes_an_error_code_and_a_message() {
        let code: c_int = guard(|| panic!("boom"));
        assert_eq!(code, GWSYNC_ERR_PANIC);
        assert_eq!(last_error(), "gwsync internal error: boom");
        let pointer: *mut gwsync_t = guard(|| panic!("{}", String::from("bang")));
        assert!(pointer.is_null());
        assert_eq!(last_error(), "gwsync internal error: bang");
        let ok: c_int = guard(|| Ok(GWSYNC_OK));
        assert_eq!(ok, GWSYNC_OK);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn config_keys_mirror_the_daemon_flags() {
        let (config, level) = driver_config(
            r#"{"interfaces":["lo"],"group":"ff02::7373","port":9,"node_id":"a1","log_level":"off","open":true}"#,
        )
        .unwrap();
        assert_eq!(config.interfaces, ["lo"]);
        assert_eq!(config.group, "ff02::7373".parse::<IpAddr>().unwrap());
        assert_eq!(config.port, 9);
        assert_eq!(config.node_id, Some(NodeId(0xa1)));
        assert_eq!(level, log::LevelFilter::Off);
        assert!(
            driver_config(r#"{"open":true}"#)
                .unwrap()
                .0
                .state_dir
                .is_none()
        );
        let no_key = driver_config("{}").err().unwrap();
        assert_eq!(no_key.code, GWSYNC_ERR_INVALID);
        assert!(
            no_key.message.contains("\"open\": true"),
            "{}",
            no_key.message
        );
        for bad in [
            r#"{"group":"10.0.0.1"}"#,
            r#"{"port":0}"#,
            r#"{"port":70000}"#,
            r#"{"node_id":"00000000000000a1f"}"#,
            r#"{"log_level":"loud"}"#,
            r#"{"interface":"lo"}"#,
            r#"{"interfaces":["../x"]}"#,
            r#"{"open":true,"open":true}"#,
            r#"{"max_entries":0}"#,
            "[]",
        ] {
            let error = driver_config(bad).err().unwrap_or_else(|| panic!("{bad}"));
            assert_eq!(error.code, GWSYNC_ERR_INVALID, "{bad}");
        }
    }

    #[test]
    fn write_errors_map_to_one_c_code_each() {
        use crate::engine::WriteError;
        let cases = [
            (SetError::InvalidJson("x".into()), GWSYNC_ERR_INVALID),
            (
                SetError::Write(WriteError::InvalidKey),
                GWSYNC_ERR_TOO_LARGE,
            ),
            (
                SetError::Write(WriteError::ValueTooLarge),
                GWSYNC_ERR_TOO_LARGE,
            ),
            (SetError::Write(WriteError::StoreFull), GWSYNC_ERR_FULL),
            (SetError::Write(WriteError::NotFound), GWSYNC_ERR_NOT_FOUND),
            (
                SetError::NotPersisted("No space left on device".into()),
                GWSYNC_ERR_NOT_PERSISTED,
            ),
        ];
        for (failure, code) in cases {
            assert_eq!(c_code(ErrorCode::from(&failure)), code, "{failure}");
        }
    }

    #[test]
    fn a_value_with_a_nul_byte_reaches_c_as_a_json_string() {
        assert_eq!(c_string("{\"a\":1}".into()).as_bytes(), b"{\"a\":1}");
        assert_eq!(c_string("x\0y".into()).as_bytes(), b"\"x\\u0000y\"");
    }
}
