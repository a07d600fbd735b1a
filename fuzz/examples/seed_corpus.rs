//! Writes the seed corpus: a few valid datagrams per target, so the fuzzer
//! starts past the magic, version and tag checks.
//!
//! `cargo run --example seed_corpus` from `fuzz/`; deterministic, so a rerun
//! rewrites the same files.

use std::fs;
use std::path::Path;

use gwsync::crypto::{GroupKey, Keyring};
use gwsync::engine::NodeId;
use gwsync::engine::clock::{Hlc, Version};
use gwsync::engine::store::BucketSummary;
use gwsync::wire::{
    self, BucketDigests, Entries, FLAG_ENCRYPTED, Fragment, HEADER_LEN, Header, Message, RepairTag,
    Summary, WireEntry,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn messages() -> Vec<Message> {
    let version = Version {
        hlc: Hlc::new(1_700_000_000_000, 1),
        origin: NodeId(0x1122_3344_5566_7788),
    };
    vec![
        Message::Summary(Summary {
            digest: 0xdead_beef,
            entries: 2,
            clock: version.hlc,
        }),
        Message::Entries(Entries {
            repair: None,
            digest: Some(9),
            entries: vec![
                WireEntry {
                    key: "scene/evening".into(),
                    version,
                    value: Some(br#"{"lights":[1,2],"level":40}"#.to_vec()),
                },
                WireEntry {
                    key: "room/3".into(),
                    version,
                    value: None,
                },
            ],
        }),
        Message::Entries(Entries {
            repair: Some(RepairTag {
                bucket: 17,
                digest: 5,
            }),
            digest: None,
            entries: vec![WireEntry {
                key: "home".into(),
                version,
                value: Some(b"\"Main\"".to_vec()),
            }],
        }),
        Message::Fragment(Fragment {
            key: "devices".into(),
            version,
            total_len: 3000,
            offset: 1300,
            chunk: vec![b'x'; 64],
        }),
        Message::BucketDigests(BucketDigests {
            digest: 9,
            first: 0,
            end: 256,
            buckets: vec![(
                17,
                BucketSummary {
                    digest: 5,
                    count: 1,
                    max_hlc: version.hlc,
                },
            )],
        }),
    ]
}

fn header(message: &Message, seq: u32) -> Header {
    Header {
        message_type: message.message_type(),
        flags: 0,
        key_id: 0,
        sender: NodeId(0x0102_0304_0506_0708),
        boot: 0x0a0b_0c0d,
        seq,
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("corpus directory");
    fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed file");
}

/// One fragment record of the reassembly target's input format.
fn fragment_record(sender: u8, ids: u8, total: u16, offset: u16, len: u8, fill: u8) -> Vec<u8> {
    let mut out = vec![0, sender, ids];
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&[len, fill]);
    out
}

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    // The keys the crypto_open target holds.
    let keyrings = [
        Keyring::new(&GroupKey::from_bytes([1; 32])),
        Keyring::new(&GroupKey::from_bytes([2; 32])),
    ];
    let mut rng = StdRng::seed_from_u64(0);
    for (index, message) in messages().iter().enumerate() {
        let header = header(message, index as u32 + 1);
        let plain = wire::encode(&header, message);
        write(&corpus.join("decode"), &format!("{index}"), &plain);

        let mut sealed_header = header;
        sealed_header.flags = FLAG_ENCRYPTED;
        let mut header_bytes = Vec::new();
        sealed_header.emit(&mut header_bytes);
        let header_bytes: [u8; HEADER_LEN] = header_bytes.try_into().expect("24 bytes");
        let keyring = &keyrings[index % 2];
        let sealed = keyring.seal(&header_bytes, &plain[HEADER_LEN..], &mut rng);
        write(&corpus.join("crypto_open"), &format!("{index}"), &sealed);
        write(&corpus.join("decode"), &format!("sealed-{index}"), &sealed);
    }

    let reassembly = corpus.join("reassembly");
    // Two halves of one value, in reverse order: completes.
    let mut complete = fragment_record(1, 0, 32, 16, 16, 7);
    complete.extend(fragment_record(1, 0, 32, 0, 16, 9));
    write(&reassembly, "complete", &complete);
    // Overlapping fragments from two senders, a clash on the total length,
    // then time passing beyond the timeout.
    let mut mixed = fragment_record(0, 1, 600, 0, 200, 1);
    mixed.extend(fragment_record(2, 1, 600, 150, 200, 2));
    mixed.extend(fragment_record(2, 1, 700, 0, 10, 3));
    mixed.extend([0xff, 0xff]);
    mixed.extend(fragment_record(0, 1, 600, 400, 200, 4));
    write(&reassembly, "mixed", &mixed);
    // Memory limits: large values from one sender.
    let mut full = Vec::new();
    for ids in 0..3 {
        full.extend(fragment_record(1, ids, 1500, 0, 255, ids));
    }
    write(&reassembly, "full", &full);
}
