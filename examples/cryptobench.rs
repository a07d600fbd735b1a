//! Cost of the group key per datagram: bytes added and time to seal and
//! open a full-size (1400-byte) datagram, against plain encode/decode.
//!
//! Run with `cargo run --release --example cryptobench`. The release
//! profile is the router's (opt-level "z"), so the figures are what a
//! gateway pays, scaled by its CPU.

use std::hint::black_box;
use std::time::Instant;

use gwsync::crypto::{GroupKey, Keyring, SEAL_OVERHEAD};
use gwsync::engine::NodeId;
use gwsync::wire::{self, FLAG_ENCRYPTED, HEADER_LEN, Header, MessageType};
use rand::SeedableRng;
use rand::rngs::StdRng;

const DATAGRAM_BYTES: usize = 1400;
const ROUNDS: u32 = 20_000;

fn ns_per_round(mut round: impl FnMut()) -> f64 {
    for _ in 0..ROUNDS / 10 {
        round();
    }
    let start = Instant::now();
    for _ in 0..ROUNDS {
        round();
    }
    start.elapsed().as_nanos() as f64 / f64::from(ROUNDS)
}

fn main() {
    let keyring = Keyring::new(&GroupKey::from_bytes([7; 32]));
    let mut rng = StdRng::from_os_rng();
    let header = Header {
        message_type: MessageType::Entries,
        flags: FLAG_ENCRYPTED,
        key_id: keyring.primary_id(),
        sender: NodeId(1),
        boot: 2,
        seq: 3,
    };
    let mut header_bytes = Vec::new();
    header.emit(&mut header_bytes);
    let header_bytes: [u8; HEADER_LEN] = header_bytes.try_into().expect("the header is 24 bytes");
    // A full datagram once sealed, as the engine sizes them.
    let payload = vec![0x5a; DATAGRAM_BYTES - HEADER_LEN - SEAL_OVERHEAD];
    let sealed = keyring.seal(&header_bytes, &payload, &mut rng);
    assert_eq!(sealed.len(), DATAGRAM_BYTES);

    let seal_ns = ns_per_round(|| {
        black_box(keyring.seal(black_box(&header_bytes), black_box(&payload), &mut rng));
    });
    let open_ns = ns_per_round(|| {
        let packet = wire::Packet::new_checked(black_box(&sealed)).expect("parses");
        black_box(keyring.open(&packet).expect("opens"));
    });
    let mut tampered = sealed.clone();
    tampered[HEADER_LEN + 30] ^= 1;
    let reject_ns = ns_per_round(|| {
        let packet = wire::Packet::new_checked(black_box(&tampered)).expect("parses");
        black_box(keyring.open(&packet).unwrap_err());
    });
    // The unkeyed baseline: copying the same bytes into a datagram.
    let copy_ns = ns_per_round(|| {
        let mut out = Vec::with_capacity(DATAGRAM_BYTES);
        out.extend_from_slice(black_box(&header_bytes));
        out.extend_from_slice(black_box(&payload));
        black_box(out);
    });
    // And parsing a header, which every datagram costs with or without a key.
    let parse_ns = ns_per_round(|| {
        black_box(wire::Header::parse(black_box(&sealed)).expect("parses"));
    });

    println!(
        "datagram: {DATAGRAM_BYTES} bytes sealed, payload {} bytes",
        payload.len()
    );
    println!("bytes added per datagram: {SEAL_OVERHEAD} (24 nonce + 16 tag)");
    println!(
        "seal:  {seal_ns:>8.0} ns  ({:.1} MB/s)",
        DATAGRAM_BYTES as f64 / seal_ns * 1e3
    );
    println!(
        "open:  {open_ns:>8.0} ns  ({:.1} MB/s)",
        DATAGRAM_BYTES as f64 / open_ns * 1e3
    );
    println!("reject (bad tag): {reject_ns:>8.0} ns");
    println!("unkeyed copy: {copy_ns:>8.0} ns, header parse: {parse_ns:>6.0} ns");
}
