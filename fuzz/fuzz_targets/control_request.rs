//! The control-socket request parser: any bytes a local client sends must
//! give a request or an error, never a panic. (A parsed `set` value is only
//! JSON *syntax*: lone surrogate escapes pass it, and the driver's full
//! parse refuses them, as the fuzzer found.)
#![no_main]

use gwsync::control::{Request, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    if let Ok(Request::Set { key, value }) = parse_request(line) {
        assert!(!value.is_empty(), "set {key:?} parsed with no value text");
    }
});
