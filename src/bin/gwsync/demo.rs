//! `gwsync demo`: three gateways on the loopback interface converge, step by
//! step. Behind the default feature `demo`, so the OpenWrt package (built
//! without default features) does not carry it to routers' flash.

use std::time::{Duration, Instant};

use gwsync::driver::{Driver, DriverConfig};
use gwsync::engine::NodeId;
use gwsync::net;

use super::{Failure, error};

/// A port nobody on this host uses right now, so two demos never meet.
fn free_port() -> u16 {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::from_os_rng();
    for _ in 0..100 {
        let port = rng.random_range(20_000..60_000);
        if std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    47_373
}

pub(crate) fn demo() -> Result<(), Failure> {
    use gwsync::wire::{self, Message};

    gwsync::logging::log_to_stderr(log::LevelFilter::Error);
    let base = std::env::temp_dir().join(format!("gwsync-demo-{}", std::process::id()));
    let names = ["gw1", "gw2", "gw3"];
    let ids = [NodeId(0x0001), NodeId(0x0002), NodeId(0x0003)];
    let name_of = |id: NodeId| {
        ids.iter()
            .position(|&known| known == id)
            .map_or_else(|| id.to_string(), |at| names[at].to_owned())
    };
    let key = "home/living-room/scene";
    // The demo's own group key: sealed like any real group, and never the
    // key of a real group that may share this host's loopback.
    let group_key = gwsync::crypto::GroupKey::generate()
        .map_err(|failure| error(format!("no randomness from the system: {failure}")))?;
    let keyring = gwsync::crypto::Keyring::new(&group_key);
    let config_for = |index: usize, port: u16| DriverConfig {
        interfaces: vec!["lo".to_owned()],
        keys: vec![group_key.clone()],
        port,
        state_dir: Some(base.join(names[index])),
        node_id: Some(ids[index]),
        // Only gw2 starts a sync request at once; the others wait (Trickle
        // Imin 2 s) so the timeline shows the method's example clearly.
        engine: {
            let mut engine = gwsync::engine::Config::default();
            if index != 1 {
                engine.trickle.imin_ms = 2_000;
            }
            engine
        },
        ..DriverConfig::default()
    };
    println!("gwsync demo: three gateways on the loopback interface acting out the method.\n");
    println!("1. Apart, each gateway writes its own value for {key}:");
    for (index, name) in names.iter().enumerate() {
        let mut driver = Driver::open(config_for(index, free_port()))
            .map_err(|failure| error(failure.to_string()))?;
        let scene = ["morning", "away", "movie"][index];
        let value = format!("{{\"scene\":\"{scene}\",\"written_by\":\"{name}\"}}");
        driver
            .set(key, &value)
            .map_err(|failure| error(failure.to_string()))?;
        println!("   {name}: {key} = {value}");
        drop(driver);
        // Versions carry wall-clock milliseconds: keep them apart.
        std::thread::sleep(Duration::from_millis(5));
    }
    let port = free_port();
    println!("\n2. They join one group (239.255.73.73 port {port}); gw2 starts a sync request.");
    println!("   Each line: time, sender, what it multicast (or what a gateway applied).\n");
    let observer = net::GroupSocket::open(net::GROUP_V4_DEFAULT.into(), port)
        .map_err(|failure| error(format!("demo socket: {failure}")))?;
    let lo = net::interface_index("lo").ok_or_else(|| error("no loopback interface"))?;
    observer
        .join(lo)
        .map_err(|failure| error(format!("joining the group on lo: {failure}")))?;
    let start = Instant::now();
    let mut drivers = Vec::new();
    for index in [1, 0, 2] {
        drivers.push((
            index,
            Driver::open(config_for(index, port)).map_err(|failure| error(failure.to_string()))?,
        ));
    }
    let mut buf = vec![0u8; 65_536];
    let mut last_datagram = Instant::now();
    let deadline = start + Duration::from_secs(15);
    let mut converged_at = None;
    while Instant::now() < deadline {
        for (index, driver) in &mut drivers {
            driver.process();
            while let Some(change) = driver.poll_change() {
                if change.origin != ids[*index] {
                    println!(
                        "{:>6} ms  {}  takes the newer data: {} = {} (written by {})",
                        start.elapsed().as_millis(),
                        names[*index],
                        change.key,
                        change.value.as_deref().unwrap_or("(deleted)"),
                        name_of(change.origin)
                    );
                }
            }
            // What this gateway just sent, before anyone else reacts to it.
            while let Ok(net::Received::Datagram(len)) = observer.recv(&mut buf) {
                last_datagram = Instant::now();
                let datagram = &buf[..len];
                let Ok(packet) = wire::Packet::new_checked(datagram) else {
                    continue;
                };
                let header = packet.header();
                let Ok(payload) = keyring.open(&packet) else {
                    continue;
                };
                let Ok(message) = Message::parse_payload(packet.message_type(), &payload) else {
                    continue;
                };
                let what = match message {
                    Message::Summary(summary) => format!(
                        "sync request: I hold {} entr{} (digest {:016x})",
                        summary.entries,
                        if summary.entries == 1 { "y" } else { "ies" },
                        summary.digest
                    ),
                    Message::BucketDigests(digests) => format!(
                        "my data differs from what I heard: bucket digests of {} bucket(s)",
                        digests.buckets.len()
                    ),
                    Message::Entries(entries) => {
                        let listed: Vec<String> = entries
                            .entries
                            .iter()
                            .map(|entry| {
                                format!(
                                    "{} = {}",
                                    entry.key,
                                    String::from_utf8_lossy(
                                        entry.value.as_deref().unwrap_or(b"(deleted)")
                                    )
                                )
                            })
                            .collect();
                        match entries.repair {
                            Some(_) => {
                                format!("I have newer data, here it is: {}", listed.join(", "))
                            }
                            None => format!("new write: {}", listed.join(", ")),
                        }
                    }
                    Message::Fragment(fragment) => format!("fragment of {}", fragment.key),
                };
                println!(
                    "{:>6} ms  {}  -> group: {what}",
                    start.elapsed().as_millis(),
                    name_of(header.sender)
                );
            }
        }
        let all_newest = drivers.iter().all(|(_, driver)| {
            driver
                .get(key)
                .is_some_and(|value| value.contains("\"written_by\":\"gw3\""))
        });
        if all_newest && converged_at.is_none() {
            converged_at = Some(start.elapsed());
        }
        if converged_at.is_some() && last_datagram.elapsed() > Duration::from_millis(500) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(drivers);
    let _ = std::fs::remove_dir_all(&base);
    match converged_at {
        Some(elapsed) => {
            println!(
                "\n3. After {} ms all three gateways hold gw3's write, the newest. Sync requests \
                 after that carry the same digest as every other gateway's, so none needs an answer.",
                elapsed.as_millis()
            );
            Ok(())
        }
        None => Err(error(
            "the gateways did not converge within 15 s: is multicast on the loopback interface blocked?",
        )),
    }
}
