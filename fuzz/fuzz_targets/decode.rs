//! The datagram decoder on arbitrary bytes: never panics, and whatever it
//! accepts encodes back to a datagram that decodes the same.
#![no_main]

use gwsync::wire::{self, HEADER_LEN, Header, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, message)) = wire::decode(data) {
        let again = wire::encode(&header, &message);
        assert_eq!(wire::decode(&again), Ok((header, message)));
    }
    // A keyed engine parses the header, opens the payload, then parses the
    // plaintext with parse_payload directly, whatever the flags say.
    if let Ok(header) = Header::parse(data) {
        let _ = Message::parse_payload(header.message_type, &data[HEADER_LEN..]);
    }
});
