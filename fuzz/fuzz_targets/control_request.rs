//! The control-socket request parser: any bytes a local client sends must
//! give a request or an error, never a panic; a parsed `set` carries a
//! value that is valid JSON text.
#![no_main]

use gwsync::control::{Request, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    if let Ok(Request::Set { value, .. }) = parse_request(line) {
        assert!(serde_json::from_str::<serde_json::value::Value>(&value).is_ok());
    }
});
