//! Keyring::open on arbitrary bytes (behind the wire's header check, as the
//! engine calls it) never panics; what it accepts stops opening when any
//! byte changes; any valid header and payload sealed open back to
//! themselves.
#![no_main]

use std::sync::OnceLock;

use gwsync::crypto::{CryptoError, GroupKey, Keyring, SEAL_OVERHEAD};
use gwsync::wire::{HEADER_LEN, Packet};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(|| {
        Keyring::with_secondary(
            &GroupKey::from_bytes([1; 32]),
            &GroupKey::from_bytes([2; 32]),
        )
    })
}

/// `None` when the wire refuses the header before any key is tried.
fn open(keyring: &Keyring, bytes: &[u8]) -> Option<Result<Vec<u8>, CryptoError>> {
    Packet::new_checked(bytes)
        .ok()
        .map(|packet| keyring.open(&packet))
}

fuzz_target!(|data: &[u8]| {
    let keyring = keyring();
    // The seeds are sealed with these keys, so some inputs do open.
    if let Some(Ok(plaintext)) = open(keyring, data) {
        assert_eq!(plaintext.len(), data.len() - HEADER_LEN - SEAL_OVERHEAD);
        let mut tampered = data.to_vec();
        let index = plaintext.len() % data.len();
        tampered[index] ^= 0x80;
        assert!(!matches!(open(keyring, &tampered), Some(Ok(_))));
    }
    if data.len() >= HEADER_LEN {
        let (header, payload) = data.split_at(HEADER_LEN);
        let header: &[u8; HEADER_LEN] = header.try_into().expect("split at the header length");
        let mut rng = StdRng::seed_from_u64(payload.len() as u64);
        let sealed = keyring.seal(header, payload, &mut rng);
        if Packet::new_checked(header).is_ok() {
            assert_eq!(open(keyring, &sealed), Some(Ok(payload.to_vec())));
        }
    }
});
