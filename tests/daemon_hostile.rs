//! Hostile datagrams from a raw UDP socket at live keyed daemons. On the
//! loopback interface (each test its own port): every kind is dropped and
//! counted under its reason, the daemon keeps running, its data is unchanged
//! and it still syncs with its keyed peers; a capture of the group's traffic
//! never shows a written value in plain text. In network namespaces (root;
//! without it the test says SKIPPED): an insider's forged, well-formed,
//! sealed datagrams against four gateways on one bridge, each case measured
//! and printed.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use common::{Daemon, Lan, TempDir, gwsync, unique_port, wait_all_have, wait_until};
use gwsync::crypto::{GroupKey, Keyring};
use gwsync::engine::clock::{Hlc, Version};
use gwsync::engine::store::BUCKETS;
use gwsync::engine::{Config, NodeId};
use gwsync::wire::{self, Entries, Fragment, Header, Message, MessageType, WireEntry};
use rand::SeedableRng;
use rand::rngs::StdRng;
use socket2::{Domain, Protocol, Socket, Type};

const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 73, 73);
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

/// A socket on the group via the interface holding `address`: sends like
/// a gateway and, joined, captures everything the gateways send.
fn raw_socket(port: u16, address: Ipv4Addr) -> UdpSocket {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket
        .bind(&SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())
        .unwrap();
    socket.join_multicast_v4(&GROUP, &address).unwrap();
    socket.set_multicast_if_v4(&address).unwrap();
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

/// Reads what arrives for `duration` (and what waited in the socket's
/// buffer), each datagram with when it was read.
fn capture(socket: &UdpSocket, duration: Duration) -> Vec<(Instant, Vec<u8>)> {
    let mut captured = Vec::new();
    let deadline = Instant::now() + duration;
    let mut buffer = vec![0u8; 65_536];
    while Instant::now() < deadline {
        if let Ok(len) = socket.recv(&mut buffer) {
            captured.push((Instant::now(), buffer[..len].to_vec()));
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
        digest: None,
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
    let raw = raw_socket(port, Ipv4Addr::LOCALHOST);

    let marker = r#""plaintext-marker-5c1e""#;
    a.set("home/alarm/code", marker);
    wait_until("b has the value", SYNC_TIMEOUT, || {
        b.get("home/alarm/code").as_deref() == Some(marker)
    });
    // A write, not a trigger: Trickle may suppress b's summary when it
    // hears a's first, but a push always goes out.
    b.set("home/b/seen", "true");
    let traffic: Vec<Vec<u8>> = capture(&raw, Duration::from_millis(1_500))
        .into_iter()
        .map(|(_, datagram)| datagram)
        .collect();
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

const DAY_MS: u64 = 86_400_000;

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Datagrams the gateways sent, as a capture saw them.
struct Sent {
    /// When each was read, its size and type.
    datagrams: Vec<(Instant, usize, MessageType)>,
}

const MESSAGE_TYPES: [MessageType; 4] = [
    MessageType::Summary,
    MessageType::Entries,
    MessageType::Fragment,
    MessageType::BucketDigests,
];

impl Sent {
    /// Bytes and datagrams of one type.
    fn of_type(&self, kind: MessageType) -> (u64, usize) {
        let of_kind = self.datagrams.iter().filter(|(_, _, k)| *k == kind);
        (
            of_kind.clone().map(|&(_, len, _)| len as u64).sum(),
            of_kind.count(),
        )
    }

    /// "2 Summary (168 B), ...".
    fn describe(&self) -> String {
        let parts: Vec<String> = MESSAGE_TYPES
            .iter()
            .map(|&kind| (kind, self.of_type(kind)))
            .filter(|(_, (_, count))| *count > 0)
            .map(|(kind, (bytes, count))| format!("{count} {kind:?} ({bytes} B)"))
            .collect();
        if parts.is_empty() {
            "nothing".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// The most bytes read within any one second.
    fn peak_bytes_per_sec(&self) -> u64 {
        let mut peak = 0;
        let mut in_window = 0;
        let mut first = 0;
        for &(at, len, _) in &self.datagrams {
            in_window += len as u64;
            while at.duration_since(self.datagrams[first].0) >= Duration::from_secs(1) {
                in_window -= self.datagrams[first].1 as u64;
                first += 1;
            }
            peak = peak.max(in_window);
        }
        peak
    }

    /// From `start` to the last data datagram (entries or fragment).
    fn data_lasted_since(&self, start: Instant) -> Duration {
        self.datagrams
            .iter()
            .filter(|(_, _, kind)| matches!(kind, MessageType::Entries | MessageType::Fragment))
            .map(|&(at, _, _)| at.saturating_duration_since(start))
            .max()
            .unwrap_or_default()
    }
}

/// What the group sent in answer to an attack: per message type, what the
/// window after it holds beyond a window of the same length just before it
/// (Trickle summaries come and go on their own).
struct Answer {
    bytes_in: u64,
    quiet: Sent,
    loud: Sent,
    start: Instant,
}

impl Answer {
    /// (bytes, datagrams) beyond the quiet window.
    fn out(&self) -> (u64, usize) {
        MESSAGE_TYPES.iter().fold((0, 0), |(bytes, count), &kind| {
            let (loud, quiet) = (self.loud.of_type(kind), self.quiet.of_type(kind));
            (
                bytes + loud.0.saturating_sub(quiet.0),
                count + loud.1.saturating_sub(quiet.1),
            )
        })
    }

    fn bytes_out(&self) -> u64 {
        self.out().0
    }

    fn datagrams_out(&self) -> usize {
        self.out().1
    }

    fn factor(&self) -> f64 {
        self.bytes_out() as f64 / self.bytes_in.max(1) as f64
    }
}

/// A host on the LAN holding the group key: sends what it likes, sealed,
/// under its own node id with a fresh sequence number each time, and hears
/// everything the gateways send.
struct Insider {
    socket: UdpSocket,
    port: u16,
    keyring: Keyring,
    id: u64,
    seq: u32,
}

impl Insider {
    /// Sends `message`; returns the datagram's size.
    fn send(&mut self, message: &Message) -> usize {
        self.seq += 1;
        let header = header(message.message_type(), self.id, self.seq);
        let datagram = sealed(&self.keyring, header, message);
        send(&self.socket, self.port, &datagram);
        datagram.len()
    }

    /// Discards what the gateways sent before now.
    fn drain(&self) {
        self.socket.set_nonblocking(true).unwrap();
        let mut buffer = vec![0u8; 65_536];
        while self.socket.recv(&mut buffer).is_ok() {}
        self.socket.set_nonblocking(false).unwrap();
    }

    /// The gateways' datagrams (not ours) of a capture.
    fn sent_by_group(&self, captured: Vec<(Instant, Vec<u8>)>) -> Sent {
        Sent {
            datagrams: captured
                .iter()
                .filter_map(|(at, datagram)| {
                    let packet = wire::Packet::new_checked(datagram).ok()?;
                    (packet.sender() != NodeId(self.id))
                        .then(|| (*at, datagram.len(), packet.message_type()))
                })
                .collect(),
        }
    }

    /// Captures `window` of normal traffic, then sends `messages` `gap`
    /// apart and captures `window` from the first.
    fn attack(&mut self, messages: &[Message], gap: Duration, window: Duration) -> Answer {
        self.drain();
        let quiet = self.sent_by_group(capture(&self.socket, window));
        let start = Instant::now();
        let mut captured = Vec::new();
        let mut bytes_in = 0;
        for message in messages {
            bytes_in += self.send(message) as u64;
            captured.extend(capture(&self.socket, gap));
        }
        captured.extend(capture(
            &self.socket,
            window.saturating_sub(start.elapsed()),
        ));
        Answer {
            bytes_in,
            quiet,
            loud: self.sent_by_group(captured),
            start,
        }
    }
}

fn node_id(daemon: &Daemon) -> String {
    daemon.status()["node_id"].as_str().unwrap().to_owned()
}

/// The hostile-peers cases against four live keyed gateways, each in its
/// own network namespace on one bridge, forged by an insider on a fifth
/// host who holds the group key (the strongest attacker a keyed group
/// has): the poison version then a local write of that key, a summary 8
/// days ahead, a replay after a restart, and against a 1,000-entry store a
/// summary with another digest, a join request and ten join requests. Each
/// case's figures are printed (`--nocapture`).
#[test]
fn lying_insiders_cannot_poison_keys_push_clocks_replay_deletes_or_draw_floods() {
    let Some(lan) = Lan::connected(
        "lying_insiders_cannot_poison_keys_push_clocks_replay_deletes_or_draw_floods",
        5,
    ) else {
        return;
    };
    let dir = TempDir::new("ns-liars");
    let port = unique_port();
    // Gateways in nodes 0 to 3; node 4 is the insider's host.
    let mut daemons: Vec<Daemon> = (0..4)
        .map(|index| lan.start(index, dir.path(), port, &[]))
        .collect();
    let key: GroupKey = std::fs::read_to_string(common::group_key_file(dir.path()))
        .unwrap()
        .parse()
        .unwrap();
    let mut insider = Insider {
        socket: lan.in_node(4, || raw_socket(port, lan.ipv4(4))),
        port,
        keyring: Keyring::new(&key),
        id: 0xf0f0_f0f0,
        seq: 0,
    };
    daemons[0].set("hello", "1");
    wait_all_have(&daemons, "hello", "1", SYNC_TIMEOUT);

    // 1. The poison datagram: key p at the largest version, then a local
    //    write of p.
    let poison = Message::Entries(Entries {
        repair: None,
        digest: None,
        entries: vec![WireEntry {
            key: "p".into(),
            version: Version {
                hlc: Hlc::MAX,
                origin: NodeId(0xbad),
            },
            value: Some(b"\"poison\"".to_vec()),
        }],
    });
    let poison_len = insider.send(&poison);
    for daemon in &daemons {
        wait_until(
            &format!("{} refuses the poison", daemon.name),
            SYNC_TIMEOUT,
            || dropped(daemon, "version_ahead") > 0,
        );
        assert_eq!(daemon.get("p"), None, "{} took the poison", daemon.name);
    }
    let written = Instant::now();
    daemons[1].set("p", "\"mine\"");
    wait_all_have(&daemons, "p", "\"mine\"", SYNC_TIMEOUT);
    eprintln!(
        "poison (key p at the largest version, {poison_len} B): refused (version_ahead) on 4 of 4; a later `set p` reached all 4 in {} ms",
        written.elapsed().as_millis()
    );

    // 2. A summary 8 days ahead moves no clock.
    let refused_before: Vec<u64> = daemons
        .iter()
        .map(|daemon| dropped(daemon, "clock_ahead"))
        .collect();
    let ahead_len = insider.send(&Message::Summary(wire::Summary {
        digest: 0xbad,
        entries: 1,
        clock: Hlc::new(wall_ms() + 8 * DAY_MS, 0),
    }));
    let mut lead_max = i64::MIN;
    for (daemon, before) in daemons.iter().zip(refused_before) {
        wait_until(
            &format!("{} refuses the summary", daemon.name),
            SYNC_TIMEOUT,
            || dropped(daemon, "clock_ahead") > before,
        );
        let clock = Hlc(daemon.status()["clock"].as_u64().unwrap()).physical_ms() as i64;
        let lead = clock - wall_ms() as i64;
        assert!(lead <= 1_000, "{}'s clock is {lead} ms ahead", daemon.name);
        lead_max = lead_max.max(lead);
    }
    eprintln!(
        "summary 8 days ahead ({ahead_len} B): refused (clock_ahead) on 4 of 4; status clocks at most {lead_max} ms ahead of wall time (bound 1,000 ms)"
    );

    // 3. A replay after a restart: writes of gw1 and gw0 captured, then
    //    door/code deleted, gw0 restarted, and the capture sent again.
    insider.drain();
    daemons[1].set("door/code", "1234");
    daemons[0].set("replay/from-gw0", "1");
    wait_all_have(&daemons, "door/code", "1234", SYNC_TIMEOUT);
    wait_all_have(&daemons, "replay/from-gw0", "1", SYNC_TIMEOUT);
    let captured: Vec<Vec<u8>> = capture(&insider.socket, Duration::from_millis(200))
        .into_iter()
        .map(|(_, datagram)| datagram)
        .filter(|datagram| {
            wire::Packet::new_checked(datagram)
                .is_ok_and(|packet| packet.sender() != NodeId(insider.id))
        })
        .collect();
    let gw0_id = u64::from_str_radix(&node_id(&daemons[0]), 16).unwrap();
    assert!(
        captured
            .iter()
            .any(|datagram| wire::Packet::new_checked(datagram)
                .is_ok_and(|packet| packet.sender() == NodeId(gw0_id))),
        "the capture holds a datagram of gw0's first boot"
    );
    let ids: Vec<String> = daemons.iter().map(node_id).collect();
    assert_eq!(daemons[1].cli(&["del", "door/code"]).code, 0);
    for daemon in &daemons {
        wait_until(
            &format!("{} deleted door/code", daemon.name),
            SYNC_TIMEOUT,
            || daemon.get("door/code").is_none(),
        );
    }
    daemons[0].terminate();
    daemons[0].restart();
    wait_until("gw0 is on the group again", SYNC_TIMEOUT, || {
        daemons[0].status()["interfaces"][0]["joined"] == true
    });
    for datagram in &captured {
        send(&insider.socket, port, datagram);
    }
    // One sender, one path: a gateway that has the insider's next write
    // has handled the whole replay before it.
    insider.send(&Message::Entries(Entries {
        repair: None,
        digest: None,
        entries: vec![WireEntry {
            key: "insider/after-replay".into(),
            version: Version {
                hlc: Hlc::new(wall_ms(), 0),
                origin: NodeId(insider.id),
            },
            value: Some(b"1".to_vec()),
        }],
    }));
    wait_all_have(&daemons, "insider/after-replay", "1", SYNC_TIMEOUT);
    for (daemon, id) in daemons.iter().zip(&ids) {
        assert_eq!(
            daemon.get("door/code"),
            None,
            "{}: a replay brought back a deleted key",
            daemon.name
        );
        assert_eq!(&node_id(daemon), id, "{} took a new node id", daemon.name);
    }
    assert!(dropped(&daemons[0], "own_id_not_fresh") > 0);
    eprintln!(
        "replay of {} captured datagrams after gw0 restarted: door/code stays deleted on 4 of 4, no node id changed; gw0 dropped {}, gw1 {}",
        captured.len(),
        daemons[0].status()["counters"]["dropped"],
        daemons[1].status()["counters"]["dropped"]
    );

    // 4. Against a store of 1,000 entries.
    let devices: Vec<String> = (0..1_000)
        .map(|i| format!(r#""device/{i:04}":{{"on":true,"level":42}}"#))
        .collect();
    let devices_file = dir.path().join("devices.json");
    std::fs::write(&devices_file, format!("{{{}}}", devices.join(","))).unwrap();
    let loaded = daemons[0].cli(&["load", devices_file.to_str().unwrap()]);
    assert_eq!(loaded.code, 0, "{loaded:?}");
    let digest = daemons[0].status()["digest"].clone();
    wait_until(
        "every gateway holds the 1,000 devices",
        Duration::from_secs(60),
        || {
            daemons
                .iter()
                .all(|daemon| daemon.status()["digest"] == digest)
        },
    );
    let store_bytes = daemons[0].status()["store_bytes"].as_u64().unwrap();
    let window = Duration::from_secs(3);

    let summary = insider.attack(
        &[Message::Summary(wire::Summary {
            digest: 0xbad,
            entries: 1,
            clock: Hlc::new(wall_ms(), 0),
        })],
        Duration::ZERO,
        window,
    );
    eprintln!(
        "summary with another digest: {} B in, {} B / {} datagrams out beyond normal traffic, {:.1}x (the 3 s after it: {}; the 3 s before: {})",
        summary.bytes_in,
        summary.bytes_out(),
        summary.datagrams_out(),
        summary.factor(),
        summary.loud.describe(),
        summary.quiet.describe()
    );
    assert!(summary.factor() <= 50.0, "{:.1}x", summary.factor());

    let join = Message::BucketDigests(wire::BucketDigests {
        digest: 0xbad,
        first: 0,
        end: BUCKETS as u16,
        buckets: Vec::new(),
    });
    let config = Config::default();
    let budget = config.repair_bytes_per_sec_max;
    // A join's answer takes about 0.5 s here, but 3 s under the cross
    // emulator on a busy machine: it must end inside the window, or it
    // spills into the next attack's quiet window.
    let join_window = Duration::from_secs(8);
    let one = insider.attack(std::slice::from_ref(&join), Duration::ZERO, join_window);
    let lasted = one.loud.data_lasted_since(one.start);
    eprintln!(
        "join request (bucket digests listing nothing) against 1,000 entries ({store_bytes} B stored): {} B in, {} B / {} datagrams out in {} ms, {:.0}x; at most {} B in one second (budget {budget} B/s)",
        one.bytes_in,
        one.bytes_out(),
        one.datagrams_out(),
        lasted.as_millis(),
        one.factor(),
        one.loud.peak_bytes_per_sec()
    );
    assert!(one.bytes_out() >= store_bytes, "a join gets the store");
    assert!(one.loud.peak_bytes_per_sec() <= budget);
    // The ten that follow must not meet this one's window.
    assert!(
        lasted + Duration::from_millis(config.repair_bucket_interval_ms) < join_window,
        "the answer lasted {lasted:?}"
    );

    let ten = insider.attack(&vec![join; 10], Duration::from_millis(90), join_window);
    eprintln!(
        "ten join requests 90 ms apart: {} B in, {} B / {} datagrams out, {:.2}x one request's answer, {:.0}x per datagram",
        ten.bytes_in,
        ten.bytes_out(),
        ten.datagrams_out(),
        ten.bytes_out() as f64 / one.bytes_out() as f64,
        ten.factor()
    );
    assert!(
        ten.bytes_out() * 2 <= one.bytes_out() * 3,
        "ten join requests drew the store more than once"
    );
}
