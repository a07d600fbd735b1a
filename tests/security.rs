//! Group keys, rotation, privacy on the wire and hostile bytes, in the
//! simulator (the live-daemon hostile tests are in tests/daemon_hostile.rs).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use gwsync::crypto::{GroupKey, Keyring};
use gwsync::engine::{Config, DropReason, Engine, NodeId};
use gwsync::sim::{Medium, Sim, engine_factory};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

const KEY_A: [u8; 32] = [0xa5; 32];
const KEY_B: [u8; 32] = [0x5b; 32];

/// Which keys a gateway holds: (primary, secondary); `None` for an open one.
type KeySpec = Option<([u8; 32], Option<[u8; 32]>)>;

fn keyring(spec: KeySpec) -> Option<Keyring> {
    let (primary, secondary) = spec?;
    let primary = GroupKey::from_bytes(primary);
    Some(match secondary {
        None => Keyring::new(&primary),
        Some(secondary) => Keyring::with_secondary(&primary, &GroupKey::from_bytes(secondary)),
    })
}

/// A simulator whose gateway `i` starts with `specs[i]`; change a spec and
/// restart the gateway to hand it new keys.
fn keyed_sim(seed: u64, specs: Rc<RefCell<Vec<KeySpec>>>) -> Sim {
    let n = specs.borrow().len();
    let inner = engine_factory(Config::default());
    let factory = Box::new(
        move |index: usize, node_id, seed, now, persisted: Option<&_>| {
            let mut gateway = inner(index, node_id, seed, now, persisted);
            let spec = specs.borrow()[index];
            let engine = gateway_engine_mut(&mut gateway);
            engine.set_keyring(keyring(spec), StdRng::seed_from_u64(seed ^ 0xfeed));
            gateway
        },
    );
    Sim::new(seed, n, Medium::default(), factory)
}

fn gateway_engine_mut(gateway: &mut Box<dyn gwsync::sim::Gateway>) -> &mut Engine {
    gateway.engine_mut().expect("an engine")
}

fn data(sim: &Sim, node: usize) -> BTreeMap<String, Vec<u8>> {
    sim.gateway(node).expect("up").data()
}

fn engine(sim: &Sim, node: usize) -> &Engine {
    sim.gateway(node)
        .and_then(|g| g.engine())
        .expect("an engine")
}

fn dropped(sim: &Sim, node: usize, name: &str) -> u64 {
    engine(sim, node)
        .counters()
        .dropped
        .iter()
        .filter(|(reason, _)| reason.name() == name)
        .map(|(_, count)| count)
        .sum()
}

#[test]
fn a_keyed_group_and_an_open_gateway_do_not_mix_data() {
    let specs = Rc::new(RefCell::new(vec![
        Some((KEY_A, None)),
        Some((KEY_A, None)),
        None,
    ]));
    let mut sim = keyed_sim(1, specs);
    sim.write(0, "secret", Some(b"\"keyed\""));
    sim.write(2, "open", Some(b"\"open\""));
    sim.run_for(10 * 60_000);
    assert_eq!(
        data(&sim, 1).get("secret").map(Vec::as_slice),
        Some(&b"\"keyed\""[..])
    );
    assert!(!data(&sim, 1).contains_key("open"));
    assert!(!data(&sim, 2).contains_key("secret"));
    assert!(
        dropped(&sim, 0, "unencrypted") > 0,
        "the keyed side counts the open datagrams"
    );
    assert!(
        dropped(&sim, 2, "bad_key") > 0,
        "the open side counts the sealed datagrams"
    );
}

#[test]
fn two_groups_with_different_keys_on_one_lan_do_not_mix_data() {
    let specs = Rc::new(RefCell::new(vec![
        Some((KEY_A, None)),
        Some((KEY_A, None)),
        Some((KEY_B, None)),
        Some((KEY_B, None)),
    ]));
    let mut sim = keyed_sim(2, specs);
    sim.write(0, "group", Some(b"\"A\""));
    sim.write(2, "group", Some(b"\"B\""));
    sim.run_for(10 * 60_000);
    assert_eq!(data(&sim, 1)["group"], b"\"A\"");
    assert_eq!(data(&sim, 3)["group"], b"\"B\"");
    assert!(dropped(&sim, 0, "unknown_key_id") + dropped(&sim, 0, "bad_tag") > 0);
}

#[test]
fn rotation_from_key_a_to_key_b_one_gateway_at_a_time_never_stops_the_sync() {
    let n = 4;
    let specs = Rc::new(RefCell::new(vec![Some((KEY_A, None)); n]));
    let mut sim = keyed_sim(3, specs.clone());
    let stages: [KeySpec; 3] = [
        Some((KEY_A, Some(KEY_B))),
        Some((KEY_B, Some(KEY_A))),
        Some((KEY_B, None)),
    ];
    let mut write = 0;
    for stage in stages {
        for node in 0..n {
            specs.borrow_mut()[node] = stage;
            sim.crash(node);
            sim.restart(node);
            // After every single switch, a write anywhere reaches everyone.
            write += 1;
            let key = format!("scene/{write}");
            let writer = (node + write) % n;
            sim.write(writer, &key, Some(b"1"));
            let reached = sim
                .run_until_condition(2_000, |sim| (0..n).all(|i| data(sim, i).contains_key(&key)));
            assert!(
                reached.is_some(),
                "write {write} stalled after switching node {node} to {stage:?}"
            );
        }
    }
}

#[test]
fn captured_group_traffic_never_contains_a_written_value_in_plain_text() {
    let specs = Rc::new(RefCell::new(vec![Some((KEY_A, None)); 3]));
    let mut sim = keyed_sim(4, specs);
    sim.start_capture();
    let marker = b"\"PLAINTEXT-MARKER-7f3a\"";
    sim.write(0, "home/secret/code", Some(marker));
    sim.run_for(5 * 60_000);
    assert_eq!(data(&sim, 1)["home/secret/code"], marker);
    let captured = sim.captured();
    assert!(captured.len() > 3, "the capture saw the sync");
    for datagram in captured {
        assert!(
            !datagram.windows(marker.len()).any(|w| w == marker),
            "value in clear"
        );
        assert!(
            !datagram.windows(11).any(|w| w == b"home/secret"),
            "key in clear"
        );
    }
}

fn engine_with_data(keyed: bool) -> Engine {
    let mut engine = Engine::new(Config::default(), NodeId(1), 1, 0);
    if keyed {
        engine.set_keyring(keyring(Some((KEY_A, None))), StdRng::seed_from_u64(9));
    }
    engine.set(0, 1_000, "room/1", b"{\"lights\":2}").unwrap();
    engine
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic_and_never_change_the_store(
        bytes in proptest::collection::vec(any::<u8>(), 0..1500),
        keyed in any::<bool>(),
    ) {
        let mut engine = engine_with_data(keyed);
        let digest = engine.store().digest();
        engine.handle_datagram(10, &bytes);
        prop_assert_eq!(engine.store().digest(), digest);
    }

    /// A valid header makes the decoder go deeper than random bytes would.
    #[test]
    fn arbitrary_payloads_behind_a_valid_header_never_panic(
        message_type in 1u8..=6,
        payload in proptest::collection::vec(any::<u8>(), 0..1400),
    ) {
        let mut engine = engine_with_data(false);
        let mut bytes = vec![0x47, 0x57, 1, message_type, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9, 0, 0, 0, 1, 0, 0, 0, 1];
        bytes.extend_from_slice(&payload);
        engine.handle_datagram(10, &bytes);
        let counters = engine.counters();
        let accounted = counters.dropped.values().sum::<u64>() + counters.entries_applied + counters.entries_stale;
        // Whatever happened was either used or counted; nothing vanished.
        prop_assert!(accounted >= 1 || matches!(message_type, 1 | 4));
        prop_assert!(engine.get("room/1").is_some());
    }
}

#[test]
fn replayed_datagrams_are_dropped_and_cause_no_answer() {
    let mut a = engine_with_data(true);
    let mut b = Engine::new(Config::default(), NodeId(2), 2, 0);
    b.set_keyring(keyring(Some((KEY_A, None))), StdRng::seed_from_u64(3));
    a.handle_timeout(a.poll_timeout());
    let push = a.poll_transmit().expect("a push");
    b.handle_datagram(1, &push);
    assert!(b.get("room/1").is_some());
    while b.poll_transmit().is_some() {}
    let sent_before = b.counters().datagrams_sent;
    for _ in 0..100 {
        b.handle_datagram(2, &push);
    }
    b.handle_timeout(3);
    assert_eq!(
        b.counters()
            .dropped
            .get(&DropReason::Replay(gwsync::crypto::ReplayError::Duplicate)),
        Some(&100)
    );
    assert_eq!(
        b.counters().datagrams_sent,
        sent_before,
        "a replay made the gateway answer"
    );
}

#[test]
fn a_flood_from_one_sender_is_rate_limited_without_starving_another() {
    let mut target = Engine::new(Config::default(), NodeId(3), 3, 0);
    let mut flooder = Engine::new(Config::default(), NodeId(4), 4, 0);
    let mut honest = Engine::new(Config::default(), NodeId(5), 5, 0);
    for i in 0..5_000 {
        flooder.set(0, 1_000, &format!("junk/{i}"), b"0").unwrap();
        flooder.handle_timeout(flooder.poll_timeout());
        while let Some(datagram) = flooder.poll_transmit() {
            target.handle_datagram(0, &datagram);
        }
    }
    honest.set(0, 1_000, "scene", b"\"real\"").unwrap();
    honest.handle_timeout(honest.poll_timeout());
    while let Some(datagram) = honest.poll_transmit() {
        target.handle_datagram(0, &datagram);
    }
    assert!(
        target
            .counters()
            .dropped
            .get(&DropReason::RateLimited)
            .is_some_and(|&n| n > 0)
    );
    assert_eq!(target.get("scene"), Some(&b"\"real\""[..]));
}
