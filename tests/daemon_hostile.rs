//! Hostile datagrams from a raw UDP socket at live keyed daemons on the
//! loopback interface (each test its own port): every kind is dropped and
//! counted under its reason, the daemon keeps running, its data is unchanged
//! and it still syncs with its keyed peers. A capture of the group's traffic
//! never shows a written value in plain text.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use common::{Daemon, TempDir, gwsync, unique_port, wait_until};
use gwsync::crypto::{GroupKey, Keyring};
use gwsync::engine::NodeId;
use gwsync::engine::clock::{Hlc, Version};
use gwsync::wire::{self, Entries, Fragment, Header, Message, MessageType, WireEntry};
use rand::SeedableRng;
use rand::rngs::StdRng;
use socket2::{Domain, Protocol, Socket, Type};

const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 73, 73);
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

/// A socket on the group via `lo`: sends like a gateway and, joined,
/// captures everything the gateways send.
fn raw_socket(port: u16) -> UdpSocket {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket
        .bind(&SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())
        .unwrap();
    socket
        .join_multicast_v4(&GROUP, &Ipv4Addr::LOCALHOST)
        .unwrap();
    socket.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    socket.set_multicast_loop_v4(true).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    socket.into()
}

fn send(socket: &UdpSocket, port: u16, bytes: &[u8]) {
    socket
        .send_to(bytes, SocketAddrV4::new(GROUP, port))
        .unwrap();
}

/// Reads what arrives for `duration`.
fn capture(socket: &UdpSocket, duration: Duration) -> Vec<Vec<u8>> {
    let mut captured = Vec::new();
    let deadline = Instant::now() + duration;
    let mut buffer = vec![0u8; 65_536];
    while Instant::now() < deadline {
        if let Ok(len) = socket.recv(&mut buffer) {
            captured.push(buffer[..len].to_vec());
        }
    }
    captured
}

fn header(message_type: MessageType, sender: u64, seq: u32) -> Header {
    Header {
        message_type,
        flags: 0,
        key_id: 0,
        sender: NodeId(sender),
        boot: 77,
        seq,
    }
}

fn sealed(keyring: &Keyring, header: Header, message: &Message) -> Vec<u8> {
    let mut head = Vec::new();
    header.emit(&mut head);
    let mut payload = Vec::new();
    message.emit_payload(&mut payload);
    keyring.seal(
        &head.try_into().unwrap(),
        &payload,
        &mut StdRng::seed_from_u64(header.seq as u64),
    )
}

fn evil_entries(key: &str) -> Message {
    Message::Entries(Entries {
        repair: None,
        entries: vec![WireEntry {
            key: key.into(),
            version: Version {
                hlc: Hlc::new(u64::MAX >> 20, 0),
                origin: NodeId(0xbad),
            },
            value: Some(b"\"pwned\"".to_vec()),
        }],
    })
}

fn dropped(daemon: &Daemon, reason: &str) -> u64 {
    daemon.status()["counters"]["dropped"][reason]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn hostile_datagrams_are_dropped_and_counted_and_the_group_keeps_syncing() {
    let dir = TempDir::new("hostile");
    let key_file = dir.path().join("group.key");
    std::fs::write(&key_file, gwsync(&["genkey"]).stdout).unwrap();
    let key: GroupKey = std::fs::read_to_string(&key_file).unwrap().parse().unwrap();
    let port = unique_port();
    let port_text = port.to_string();
    let args = [
        "--interface",
        "lo",
        "--port",
        &port_text,
        "--key-file",
        key_file.to_str().unwrap(),
    ];
    let a = Daemon::start(dir.path(), "a", None, &args);
    let b = Daemon::start(dir.path(), "b", None, &args);
    let raw = raw_socket(port);

    let marker = r#""plaintext-marker-5c1e""#;
    a.set("home/alarm/code", marker);
    wait_until("b has the value", SYNC_TIMEOUT, || {
        b.get("home/alarm/code").as_deref() == Some(marker)
    });
    // A write, not a trigger: Trickle may suppress b's summary when it
    // hears a's first, but a push always goes out.
    b.set("home/b/seen", "true");
    let traffic = capture(&raw, Duration::from_millis(1_500));
    assert!(!traffic.is_empty(), "the capture saw the group");
    for datagram in &traffic {
        assert!(
            !datagram
                .windows(marker.len())
                .any(|w| w == marker.as_bytes()),
            "value in clear"
        );
        assert!(
            !datagram.windows(10).any(|w| w == b"home/alarm"),
            "key in clear"
        );
    }
    // Replayed to a, a datagram of b's (a's own would count as "own").
    let b_id = u64::from_str_radix(b.status()["node_id"].as_str().unwrap(), 16).unwrap();
    let genuine = traffic
        .iter()
        .find(|datagram| datagram.len() > 16 && datagram[8..16] == b_id.to_be_bytes())
        .expect("b sent something during the capture")
        .clone();
    let before = a.cli(&["dump"]).stdout;

    // Truncated, bit-flipped, replayed and unknown-version copies of a real one.
    send(&raw, port, &genuine[..10]);
    let mut flipped = genuine.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    send(&raw, port, &flipped);
    send(&raw, port, &genuine);
    let mut future = genuine.clone();
    future[2] = wire::PROTOCOL_VERSION + 1;
    send(&raw, port, &future);
    // Sealed with another group's key, and valid-looking but unsealed.
    let stranger = Keyring::new(&GroupKey::from_bytes([0x11; 32]));
    send(
        &raw,
        port,
        &sealed(
            &stranger,
            header(MessageType::Entries, 0xe1, 1),
            &evil_entries("home/alarm/code"),
        ),
    );
    send(
        &raw,
        port,
        &wire::encode(
            &header(MessageType::Entries, 0xe2, 1),
            &evil_entries("home/alarm/code"),
        ),
    );
    // Oversized: a 60 KB datagram, and (sealed with the right key, as an
    // insider could) a fragment announcing a 100 MB value and a key over the
    // key limit.
    let mut oversized = genuine.clone();
    oversized.resize(60_000, 0xee);
    send(&raw, port, &oversized);
    let insider = Keyring::new(&key);
    let huge = Message::Fragment(Fragment {
        key: "big".into(),
        version: Version::default(),
        total_len: 100_000_000,
        offset: 0,
        chunk: vec![1; 100],
    });
    send(
        &raw,
        port,
        &sealed(&insider, header(MessageType::Fragment, 0xe3, 1), &huge),
    );
    send(
        &raw,
        port,
        &sealed(
            &insider,
            header(MessageType::Entries, 0xe3, 2),
            &evil_entries(&"k".repeat(1_000)),
        ),
    );

    let reasons = [
        "truncated",
        "bad_tag",
        "replay_duplicate",
        "unknown_version",
        "unencrypted",
        "reassembly_full",
        "over_limit",
    ];
    wait_until("every hostile datagram is counted", SYNC_TIMEOUT, || {
        reasons.iter().all(|reason| dropped(&a, reason) > 0)
            && dropped(&a, "unknown_key_id") + dropped(&a, "bad_tag") >= 2
    });
    let status = a.status();
    eprintln!("dropped per reason: {}", status["counters"]["dropped"]);
    assert_eq!(
        a.cli(&["dump"]).stdout,
        before,
        "hostile input changed the data"
    );
    assert_eq!(a.get("home/alarm/code").as_deref(), Some(marker));

    // Still alive and still syncing with its keyed peer, both ways.
    b.set("scene/evening", r#"{"lights":"dim"}"#);
    wait_until("a still syncs", SYNC_TIMEOUT, || {
        a.get("scene/evening").as_deref() == Some(r#"{"lights":"dim"}"#)
    });
    a.set("scene/morning", "1");
    wait_until("b still syncs", SYNC_TIMEOUT, || {
        b.get("scene/morning").as_deref() == Some("1")
    });
}

/// Bytes the daemons sent (datagrams not from `forger`) while `duration`
/// passes.
fn group_bytes(socket: &UdpSocket, forger: u64, duration: Duration) -> (u64, usize) {
    let sent: Vec<Vec<u8>> = capture(socket, duration)
        .into_iter()
        .filter(|datagram| datagram.len() < 16 || datagram[8..16] != forger.to_be_bytes())
        .collect();
    (sent.iter().map(|d| d.len() as u64).sum(), sent.len())
}

/// The hostile-peers cases against live daemons, forged by an insider who
/// holds the group key (the strongest attacker a keyed group has): the
/// poison version then a local write of that key, a summary 8 days ahead,
/// a replay after a restart, and one spoofed bucket-digests datagram
/// against a 1,000-entry store, whose amplification is printed.
#[test]
fn lying_insiders_cannot_poison_keys_push_clocks_replay_deletes_or_draw_floods() {
    let dir = TempDir::new("liars");
    let key_file = dir.path().join("group.key");
    std::fs::write(&key_file, gwsync(&["genkey"]).stdout).unwrap();
    let key: GroupKey = std::fs::read_to_string(&key_file).unwrap().parse().unwrap();
    let insider = Keyring::new(&key);
    let port = unique_port();
    let port_text = port.to_string();
    let args = [
        "--interface",
        "lo",
        "--port",
        &port_text,
        "--key-file",
        key_file.to_str().unwrap(),
    ];
    let mut a = Daemon::start(dir.path(), "a", None, &args);
    let b = Daemon::start(dir.path(), "b", None, &args);
    let raw = raw_socket(port);
    let forger = 0xf0f0_u64;
    let mut seq = 0;
    let mut forge = |message: &Message| {
        seq += 1;
        sealed(
            &insider,
            header(message.message_type(), forger, seq),
            message,
        )
    };

    // 1. The poison datagram: key p at the largest version, then a local
    //    write of p on the gateway that heard it.
    let poison = Message::Entries(Entries {
        repair: None,
        entries: vec![WireEntry {
            key: "p".into(),
            version: Version {
                hlc: Hlc(u64::MAX),
                origin: NodeId(0xbad),
            },
            value: Some(b"\"poison\"".to_vec()),
        }],
    });
    send(&raw, port, &forge(&poison));
    wait_until("the poison is refused", SYNC_TIMEOUT, || {
        dropped(&a, "version_ahead") > 0
    });
    assert_eq!(a.get("p"), None);
    a.set("p", "\"mine\"");
    assert_eq!(a.get("p").as_deref(), Some("\"mine\""));
    wait_until("b has p", SYNC_TIMEOUT, || {
        b.get("p").as_deref() == Some("\"mine\"")
    });

    // 2. A summary 8 days ahead moves no clock.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ahead = Message::Summary(wire::Summary {
        digest: 0xbad,
        entries: 1,
        clock: Hlc::new(now_ms + 8 * 86_400_000, 0),
    });
    send(&raw, port, &forge(&ahead));
    wait_until("the summary is refused", SYNC_TIMEOUT, || {
        dropped(&a, "clock_ahead") > 0
    });
    for daemon in [&a, &b] {
        let clock = Hlc(daemon.status()["clock"].as_u64().unwrap());
        assert!(
            clock.physical_ms() < now_ms + 10 * 60_000,
            "clock moved to {} ms ahead",
            clock.physical_ms() - now_ms
        );
    }

    // 3. A replay after a restart: b's write of door/code, captured, then
    //    deleted, then a restarts and hears the capture again.
    b.set("door/code", "1234");
    let traffic = capture(&raw, Duration::from_millis(1_000));
    wait_until("a has door/code", SYNC_TIMEOUT, || {
        a.get("door/code").is_some()
    });
    b.cli(&["del", "door/code"]);
    wait_until("a deleted door/code", SYNC_TIMEOUT, || {
        a.get("door/code").is_none()
    });
    let a_id = a.status()["node_id"].as_str().unwrap().to_owned();
    a.terminate();
    a.restart();
    for datagram in &traffic {
        send(&raw, port, datagram);
    }
    std::thread::sleep(Duration::from_millis(300));
    b.set("after/replay", "1");
    wait_until("a hears b after the replay", SYNC_TIMEOUT, || {
        a.get("after/replay").is_some()
    });
    assert_eq!(a.get("door/code"), None, "a replay brought back a delete");
    assert_eq!(a.status()["node_id"].as_str().unwrap(), a_id);

    // 4. One spoofed bucket-digests datagram against 1,000 entries.
    for i in 0..1_000 {
        a.set(&format!("device/{i:04}"), r#"{"on":true,"level":42}"#);
    }
    wait_until("b holds 1,000 devices", Duration::from_secs(60), || {
        b.get("device/0999").is_some()
    });
    let (quiet_bytes, _) = group_bytes(&raw, forger, Duration::from_millis(1_000));
    let mut amplification = Vec::new();
    for (name, message) in [
        (
            "summary, other digest",
            Message::Summary(wire::Summary {
                digest: 0xbad,
                entries: 1,
                clock: Hlc::new(now_ms, 0),
            }),
        ),
        (
            "bucket digests, empty store (join)",
            Message::BucketDigests(wire::BucketDigests {
                digest: 0xbad,
                first: 0,
                end: 256,
                buckets: Vec::new(),
            }),
        ),
    ] {
        let datagram = forge(&message);
        send(&raw, port, &datagram);
        let (bytes, datagrams) = group_bytes(&raw, forger, Duration::from_millis(1_000));
        let answer = bytes.saturating_sub(quiet_bytes);
        let factor = answer as f64 / datagram.len() as f64;
        eprintln!(
            "{name}: {} B in, {answer} B / {datagrams} datagrams out, {factor:.1}x",
            datagram.len()
        );
        amplification.push((name, factor));
    }
    assert!(amplification[0].1 <= 50.0, "{amplification:?}");
    let store_bytes = a.status()["store_bytes"].as_u64().unwrap_or(u64::MAX);
    eprintln!("store: {store_bytes} bytes");
}
