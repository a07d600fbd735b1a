//! Keyring::open on arbitrary bytes never panics; what it accepts stops
//! opening when any byte changes; any bytes sealed open back to themselves.
#![no_main]

use std::sync::OnceLock;

use gwsync::crypto::{GroupKey, Keyring, SEAL_OVERHEAD};
use gwsync::wire::HEADER_LEN;
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

fuzz_target!(|data: &[u8]| {
    let keyring = keyring();
    // The seeds are sealed with these keys, so some inputs do open.
    if let Ok(plaintext) = keyring.open(data) {
        assert_eq!(plaintext.len(), data.len() - HEADER_LEN - SEAL_OVERHEAD);
        let mut tampered = data.to_vec();
        let index = plaintext.len() % data.len();
        tampered[index] ^= 0x80;
        assert!(keyring.open(&tampered).is_err());
    }
    if data.len() >= HEADER_LEN {
        let (header, payload) = data.split_at(HEADER_LEN);
        let header: &[u8; HEADER_LEN] = header.try_into().expect("split at the header length");
        let mut rng = StdRng::seed_from_u64(payload.len() as u64);
        let sealed = keyring.seal(header, payload, &mut rng);
        assert_eq!(keyring.open(&sealed).as_deref(), Ok(payload));
    }
});
