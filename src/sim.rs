//! A deterministic simulator: many gateways on one simulated multicast LAN,
//! in virtual time, driven by one seed.
//!
//! The LAN delivers every datagram to every other gateway in the sender's
//! partition, each copy independently lost, duplicated or delayed (jitter
//! reorders them). Gateways crash and restart from their persisted state,
//! and their wall clocks can be skewed or jump. The same seed always gives
//! the same run, so a failing seed replays exactly: tests print it.
//!
//! The simulator drives anything that implements [`Gateway`]: the gwsync
//! [`Engine`] and, as the benchmark baseline, [`BareMethod`] (the method
//! exactly as first published: one version for the whole data set, the
//! whole set multicast on each sync request).

pub mod bench;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::rc::Rc;

use rand::{Rng, SeedableRng};

use crate::engine::clock::Hlc;
use crate::engine::store::Entry;
use crate::engine::{Config, Engine, NodeId, SeededRng, TriggerReason};
use crate::persist::Debounce;

pub mod byzantine;

/// Wall clock of an unskewed simulated gateway at virtual time 0: a date in
/// 2026, so skews of hours either way stay positive.
pub const WALL_EPOCH_MS: u64 = 1_780_000_000_000;

/// What the simulator needs from a gateway implementation.
pub trait Gateway {
    fn handle_datagram(&mut self, now: u64, bytes: &[u8]);
    fn handle_timeout(&mut self, now: u64);
    fn poll_transmit(&mut self) -> Option<Vec<u8>>;
    fn poll_timeout(&self) -> u64;
    fn write(&mut self, now: u64, wall_ms: u64, key: &str, value: Option<&[u8]>);
    fn trigger(&mut self, now: u64);
    /// The gateway's wall clock reads `wall_ms` at `now`.
    fn set_wall_clock(&mut self, _now: u64, _wall_ms: u64) {}
    /// Live values (no tombstones), for convergence checks.
    fn data(&self) -> BTreeMap<String, Vec<u8>>;
    /// `data()[key] == value`, without copying the data: checked after
    /// every simulated event, so a 10,000-entry copy there dominates a run.
    fn holds(&self, key: &str, value: &[u8]) -> bool {
        self.data().get(key).map(Vec::as_slice) == Some(value)
    }
    /// `data().len()`, without copying the data.
    fn live_len(&self) -> usize {
        self.data().len()
    }
    /// Equal on two gateways exactly when they hold the same data.
    fn digest(&self) -> u64;
    /// Nothing but periodic traffic pending.
    fn is_idle(&self) -> bool;
    /// What survives a crash.
    fn persisted(&self) -> Persisted;
    /// Moves whenever something worth persisting changed (see
    /// [`Engine::state_generation`]); a constant means "write through".
    fn state_generation(&self) -> u64 {
        0
    }
    /// Back to its periodic rhythm (for gwsync: the Trickle interval is
    /// at `Imax` again).
    fn at_steady_state(&self) -> bool {
        true
    }
    /// False for a byzantine node ([`byzantine::Forger`]): convergence and
    /// quiet are judged over honest gateways only.
    fn is_honest(&self) -> bool {
        true
    }
    /// The gwsync engine behind this gateway, for inspection.
    fn engine(&self) -> Option<&Engine> {
        None
    }
    fn engine_mut(&mut self) -> Option<&mut Engine> {
        None
    }
}

/// The state a gateway keeps on flash.
#[derive(Clone, Debug, Default)]
pub struct Persisted {
    pub node_id: NodeId,
    pub clock: Hlc,
    pub entries: Vec<(String, Entry)>,
    /// Opaque state of other implementations.
    pub blob: Vec<u8>,
}

impl Gateway for Engine {
    fn handle_datagram(&mut self, now: u64, bytes: &[u8]) {
        Engine::handle_datagram(self, now, bytes);
        while self.poll_event().is_some() {}
    }
    fn handle_timeout(&mut self, now: u64) {
        Engine::handle_timeout(self, now);
        while self.poll_event().is_some() {}
    }
    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        Engine::poll_transmit(self)
    }
    fn poll_timeout(&self) -> u64 {
        Engine::poll_timeout(self)
    }
    fn write(&mut self, now: u64, wall_ms: u64, key: &str, value: Option<&[u8]>) {
        let result = match value {
            Some(value) => self.set(now, wall_ms, key, value),
            None => self.delete(now, wall_ms, key),
        };
        // Deleting an absent key is a no-op for the scenario, not a failure.
        if let Err(error) = result {
            assert_eq!(
                error,
                crate::engine::WriteError::NotFound,
                "write {key}: {error}"
            );
        }
        while self.poll_event().is_some() {}
    }
    fn trigger(&mut self, now: u64) {
        Engine::trigger(self, now, TriggerReason::Manual);
    }

    fn set_wall_clock(&mut self, now: u64, wall_ms: u64) {
        Engine::set_wall_clock(self, now, wall_ms);
    }
    fn data(&self) -> BTreeMap<String, Vec<u8>> {
        self.store()
            .iter()
            .filter_map(|(key, entry)| Some((key.to_owned(), entry.value?.to_vec())))
            .collect()
    }
    fn holds(&self, key: &str, value: &[u8]) -> bool {
        self.get(key) == Some(value)
    }
    fn live_len(&self) -> usize {
        self.store()
            .iter()
            .filter(|(_, entry)| entry.value.is_some())
            .count()
    }
    fn digest(&self) -> u64 {
        self.store().digest()
    }
    fn is_idle(&self) -> bool {
        Engine::is_idle(self)
    }
    fn persisted(&self) -> Persisted {
        Persisted {
            node_id: self.node_id(),
            clock: self.clock_high_water(),
            entries: self
                .store()
                .iter()
                .map(|(key, entry)| (key.to_owned(), entry.to_owned()))
                .collect(),
            blob: Vec::new(),
        }
    }
    fn at_steady_state(&self) -> bool {
        self.trickle_interval_ms() >= self.config().trickle.imax_ms
    }
    fn state_generation(&self) -> u64 {
        Engine::state_generation(self)
    }
    fn engine(&self) -> Option<&Engine> {
        Some(self)
    }
    fn engine_mut(&mut self) -> Option<&mut Engine> {
        Some(self)
    }
}

/// Builds a gateway: (node index, node id, seed, now, persisted state).
pub type Factory = Box<dyn Fn(usize, NodeId, u64, u64, Option<&Persisted>) -> Box<dyn Gateway>>;

/// A factory for gwsync engines with the given configuration.
pub fn engine_factory(config: Config) -> Factory {
    Box::new(move |_, node_id, seed, now, persisted| {
        let node_id = persisted.map_or(node_id, |persisted| persisted.node_id);
        let mut engine = Engine::new(config.clone(), node_id, seed, now);
        if let Some(persisted) = persisted {
            engine.restore(persisted.clock, persisted.entries.iter().cloned());
        }
        Box::new(engine)
    })
}

/// Faults of the simulated LAN. Percentages apply to each copy of each
/// datagram independently, unless loss comes in bursts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Medium {
    pub loss_percent: u32,
    /// Mean length of a stretch in which a gateway hears nothing, in ms;
    /// 0 loses each datagram on its own. Multicast over Wi-Fi is lost in
    /// bursts: interference, a station dozing through a beacon interval.
    /// `loss_percent` stays the share of time (so of datagrams) lost.
    pub loss_burst_ms: u64,
    pub duplicate_percent: u32,
    pub delay_ms_min: u64,
    pub delay_ms_max: u64,
}

impl Default for Medium {
    fn default() -> Self {
        Medium {
            loss_percent: 0,
            loss_burst_ms: 0,
            duplicate_percent: 0,
            delay_ms_min: 1,
            delay_ms_max: 1,
        }
    }
}

/// What one gateway hears of the medium over time, for loss in bursts:
/// stretches of hearing and of not hearing alternate, each as long as an
/// exponential draw (a two-state Gilbert channel in continuous time).
#[derive(Clone, Copy, Debug, Default)]
pub struct Reception {
    /// `None` until first asked, then (losing, until when in ms).
    state: Option<(bool, f64)>,
}

impl Reception {
    /// Whether a datagram reaching this gateway at `now` is lost.
    pub fn lost(&mut self, now: u64, medium: &Medium, rng: &mut SeededRng) -> bool {
        let loss = medium.loss_percent;
        if medium.loss_burst_ms == 0 || loss == 0 || loss >= 100 {
            return rng.random_range(0..100) < loss;
        }
        let burst = medium.loss_burst_ms as f64;
        let clear = burst * f64::from(100 - loss) / f64::from(loss);
        let stretch = |losing: bool, rng: &mut SeededRng| {
            let mean = if losing { burst } else { clear };
            -mean * (1.0 - rng.random::<f64>()).ln()
        };
        let now = now as f64;
        // A stretch starts in the long-run mix of the two when first asked,
        // and again after a long silence (an idle group's seconds between
        // summaries would otherwise be walked through stretch by stretch):
        // memoryless stretches forget their past within a few of them.
        let forgotten = |(_, until): (bool, f64)| now - until > 64.0 * (burst + clear);
        let (mut losing, mut until) = self
            .state
            .filter(|&state| !forgotten(state))
            .unwrap_or_else(|| {
                let losing = rng.random_range(0..100) < loss;
                (losing, now + stretch(losing, rng))
            });
        while until <= now {
            losing = !losing;
            until += stretch(losing, rng);
        }
        self.state = Some((losing, until));
        losing
    }
}

struct Node {
    gateway: Option<Box<dyn Gateway>>,
    node_id: NodeId,
    persisted: Persisted,
    /// `Some` when the state file is written as the driver writes it.
    debounce: Option<Debounce>,
    clock_offset_ms: i64,
    partition: u32,
    reception: Reception,
}

/// Totals over a run, for the benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub datagrams: u64,
    pub bytes: u64,
}

/// A datagram copy on the wire: (delivery time, tie-break, receiver, bytes).
type InFlight = (u64, u64, usize, Rc<[u8]>);

/// A simulated LAN of gateways.
pub struct Sim {
    now: u64,
    rng: SeededRng,
    medium: Medium,
    factory: Factory,
    nodes: Vec<Node>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    sequence: u64,
    traffic: Traffic,
    /// Every datagram sent, when capturing (what a tcpdump would see).
    capture: Option<Vec<Rc<[u8]>>>,
    persist_interval_ms: Option<u64>,
}

impl Sim {
    /// `n` gateways, all starting at virtual time 0.
    pub fn new(seed: u64, n: usize, medium: Medium, factory: Factory) -> Sim {
        let mut sim = Sim {
            now: 0,
            rng: SeededRng::seed_from_u64(seed),
            medium,
            factory,
            nodes: Vec::new(),
            in_flight: BinaryHeap::new(),
            sequence: 0,
            traffic: Traffic::default(),
            capture: None,
            persist_interval_ms: None,
        };
        for _ in 0..n {
            sim.add_node();
        }
        sim
    }

    /// Adds a fresh, empty gateway now; returns its index.
    pub fn add_node(&mut self) -> usize {
        let index = self.nodes.len();
        let node_id = NodeId(self.rng.random());
        let seed = self.rng.random();
        let gateway = (self.factory)(index, node_id, seed, self.now, None);
        self.nodes.push(Node {
            gateway: Some(gateway),
            node_id,
            persisted: Persisted {
                node_id,
                ..Persisted::default()
            },
            debounce: self
                .persist_interval_ms
                .map(|interval| Debounce::new(interval, 0)),
            clock_offset_ms: 0,
            partition: 0,
            reception: Reception::default(),
        });
        self.tell_wall_clock(index);
        self.flush(index);
        index
    }

    /// Adds a gateway built elsewhere (a byzantine node, say) now; returns
    /// its index. It cannot restart after a crash.
    pub fn add_gateway(&mut self, gateway: Box<dyn Gateway>) -> usize {
        let index = self.nodes.len();
        let node_id = NodeId(self.rng.random());
        self.nodes.push(Node {
            gateway: Some(gateway),
            node_id,
            persisted: Persisted {
                node_id,
                ..Persisted::default()
            },
            debounce: self
                .persist_interval_ms
                .map(|interval| Debounce::new(interval, 0)),
            clock_offset_ms: 0,
            partition: 0,
            reception: Reception::default(),
        });
        self.tell_wall_clock(index);
        self.flush(index);
        index
    }

    /// Multicasts `bytes` from a host that runs no gateway (a spoofer on
    /// the LAN), to every gateway of partition 0.
    pub fn inject(&mut self, bytes: Vec<u8>) {
        let bytes: Rc<[u8]> = bytes.into();
        for to in 0..self.nodes.len() {
            if self.nodes[to].partition == 0 {
                self.sequence += 1;
                let at = self.now + self.medium.delay_ms_min;
                self.in_flight
                    .push(Reverse((at, self.sequence, to, bytes.clone())));
            }
        }
    }

    /// Gives node `index` its wall clock, as the driver does before every
    /// input.
    fn tell_wall_clock(&mut self, index: usize) {
        let (now, wall) = (self.now, self.wall_ms(index));
        if let Some(gateway) = self.nodes[index].gateway.as_mut() {
            gateway.set_wall_clock(now, wall);
        }
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Starts keeping a copy of every datagram sent from now on.
    pub fn start_capture(&mut self) {
        self.capture.get_or_insert_with(Vec::new);
    }

    pub fn captured(&self) -> &[Rc<[u8]>] {
        self.capture.as_deref().unwrap_or_default()
    }

    pub fn set_medium(&mut self, medium: Medium) {
        self.medium = medium;
    }

    pub fn rng(&mut self) -> &mut SeededRng {
        &mut self.rng
    }

    /// The wall clock of node `index` now.
    pub fn wall_ms(&self, index: usize) -> u64 {
        (WALL_EPOCH_MS as i64 + self.now as i64 + self.nodes[index].clock_offset_ms) as u64
    }

    /// Sets how far node `index`'s wall clock is from true time; a smaller
    /// value than before is a clock jumping back.
    pub fn set_clock_offset(&mut self, index: usize, offset_ms: i64) {
        self.nodes[index].clock_offset_ms = offset_ms;
    }

    /// Puts node `index` in partition `partition`; datagrams only reach
    /// nodes in the same partition. All start in partition 0.
    pub fn set_partition(&mut self, index: usize, partition: u32) {
        self.nodes[index].partition = partition;
    }

    pub fn heal(&mut self) {
        for node in &mut self.nodes {
            node.partition = 0;
        }
    }

    pub fn is_up(&self, index: usize) -> bool {
        self.nodes[index].gateway.is_some()
    }

    /// From now on gateways write their state file as the driver does:
    /// through [`Debounce`] (at most once per `interval_ms`, the first
    /// change at once), so a crash loses what changed since the last write.
    /// Without it the file is written through on every change and a crash
    /// loses only timers and datagrams in flight.
    pub fn persist_debounced(&mut self, interval_ms: u64) {
        self.persist_interval_ms = Some(interval_ms);
        for node in &mut self.nodes {
            let generation = node.gateway.as_ref().map_or(0, |g| g.state_generation());
            node.debounce = Some(Debounce::new(interval_ms, generation));
            if let Some(gateway) = node.gateway.as_ref() {
                node.persisted = gateway.persisted();
            }
        }
    }

    /// The state node `index` would restart from now.
    pub fn persisted(&self, index: usize) -> &Persisted {
        &self.nodes[index].persisted
    }

    /// Writes node `index`'s state if the debounce says so now.
    fn persist(&mut self, index: usize) {
        let now = self.now;
        let node = &mut self.nodes[index];
        let (Some(gateway), Some(debounce)) = (node.gateway.as_ref(), node.debounce.as_mut())
        else {
            return;
        };
        let generation = gateway.state_generation();
        if debounce.due(generation).is_some_and(|due| due <= now) {
            node.persisted = gateway.persisted();
            debounce.written(now, generation);
        }
    }

    /// Stops node `index` at once: timers, datagrams in flight and, with
    /// [`Sim::persist_debounced`], changes not yet written are lost.
    pub fn crash(&mut self, index: usize) {
        if let Some(gateway) = self.nodes[index].gateway.take() {
            if self.nodes[index].debounce.is_none() {
                self.nodes[index].persisted = gateway.persisted();
            }
        }
    }

    /// Restarts node `index` from its persisted state.
    pub fn restart(&mut self, index: usize) {
        let seed = self.rng.random();
        let node = &mut self.nodes[index];
        let gateway = (self.factory)(index, node.node_id, seed, self.now, Some(&node.persisted));
        node.debounce = self
            .persist_interval_ms
            .map(|interval| Debounce::new(interval, gateway.state_generation()));
        node.gateway = Some(gateway);
        self.tell_wall_clock(index);
        self.flush(index);
    }

    pub fn gateway(&self, index: usize) -> Option<&dyn Gateway> {
        self.nodes[index].gateway.as_deref()
    }

    pub fn gateway_mut(&mut self, index: usize) -> Option<&mut (dyn Gateway + 'static)> {
        self.nodes[index].gateway.as_deref_mut()
    }

    /// A local write on node `index` (`None` deletes).
    pub fn write(&mut self, index: usize, key: &str, value: Option<&[u8]>) {
        let now = self.now;
        let wall = self.wall_ms(index);
        if let Some(gateway) = self.nodes[index].gateway.as_mut() {
            gateway.write(now, wall, key, value);
        }
        self.flush(index);
        self.persist(index);
    }

    pub fn trigger(&mut self, index: usize) {
        let now = self.now;
        if let Some(gateway) = self.nodes[index].gateway.as_mut() {
            gateway.trigger(now);
        }
        self.flush(index);
    }

    /// Queues what node `index` wants to send.
    fn flush(&mut self, index: usize) {
        let Some(gateway) = self.nodes[index].gateway.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        while let Some(bytes) = gateway.poll_transmit() {
            out.push(bytes);
        }
        for bytes in out {
            self.multicast(index, bytes);
        }
    }

    fn multicast(&mut self, from: usize, bytes: Vec<u8>) {
        let bytes: Rc<[u8]> = bytes.into();
        if let Some(capture) = self.capture.as_mut() {
            capture.push(bytes.clone());
        }
        self.traffic.datagrams += 1;
        self.traffic.bytes += bytes.len() as u64;
        let partition = self.nodes[from].partition;
        for to in 0..self.nodes.len() {
            if to == from || self.nodes[to].partition != partition {
                continue;
            }
            let copies = if self.rng.random_range(0..100) < self.medium.duplicate_percent {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let reception = &mut self.nodes[to].reception;
                if reception.lost(self.now, &self.medium, &mut self.rng) {
                    continue;
                }
                let delay = self.rng.random_range(
                    self.medium.delay_ms_min
                        ..=self.medium.delay_ms_max.max(self.medium.delay_ms_min),
                );
                self.sequence += 1;
                self.in_flight.push(Reverse((
                    self.now + delay,
                    self.sequence,
                    to,
                    bytes.clone(),
                )));
            }
        }
    }

    fn next_event_time(&self) -> Option<u64> {
        let delivery = self.in_flight.peek().map(|Reverse((at, ..))| *at);
        let timers = self
            .nodes
            .iter()
            .filter_map(|node| {
                let gateway = node.gateway.as_ref()?;
                let write = node
                    .debounce
                    .as_ref()
                    .and_then(|debounce| debounce.due(gateway.state_generation()));
                Some(write.map_or(gateway.poll_timeout(), |at| at.min(gateway.poll_timeout())))
            })
            .min();
        match (delivery, timers) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Processes every event up to and including virtual time `until`.
    pub fn run_until(&mut self, until: u64) {
        while let Some(at) = self.next_event_time() {
            if at > until {
                break;
            }
            self.now = self.now.max(at);
            self.step();
        }
        self.now = self.now.max(until);
    }

    pub fn run_for(&mut self, duration_ms: u64) {
        self.run_until(self.now + duration_ms);
    }

    fn step(&mut self) {
        let now = self.now;
        while self
            .in_flight
            .peek()
            .is_some_and(|Reverse((at, ..))| *at <= now)
        {
            let Reverse((_, _, to, bytes)) = self.in_flight.pop().expect("peeked");
            self.tell_wall_clock(to);
            if let Some(gateway) = self.nodes[to].gateway.as_mut() {
                gateway.handle_datagram(now, &bytes);
                self.flush(to);
            }
            self.persist(to);
        }
        for index in 0..self.nodes.len() {
            let due = self.nodes[index]
                .gateway
                .as_ref()
                .is_some_and(|gateway| gateway.poll_timeout() <= now);
            if due {
                self.tell_wall_clock(index);
                if let Some(gateway) = self.nodes[index].gateway.as_mut() {
                    gateway.handle_timeout(now);
                }
                self.flush(index);
            }
            self.persist(index);
        }
    }

    /// True when every running gateway holds the same data.
    pub fn converged(&self) -> bool {
        let mut digests = self.honest().map(|gateway| gateway.digest());
        let Some(first) = digests.next() else {
            return true;
        };
        digests.all(|digest| digest == first)
    }

    /// Converged, nothing in flight and nothing pending but periodic traffic.
    pub fn quiet(&self) -> bool {
        self.in_flight.is_empty()
            && self.converged()
            && self.honest().all(|gateway| gateway.is_idle())
    }

    /// Quiet, and every gateway back at its periodic rhythm.
    pub fn settled(&self) -> bool {
        self.quiet() && self.honest().all(|gateway| gateway.at_steady_state())
    }

    /// The running honest gateways.
    fn honest(&self) -> impl Iterator<Item = &dyn Gateway> {
        self.nodes
            .iter()
            .filter_map(|node| node.gateway.as_deref())
            .filter(|gateway| gateway.is_honest())
    }

    /// Runs until `condition` holds, checking after every event; returns the
    /// virtual time it took, or `None` if `limit_ms` passed first (a run that
    /// never settles fails instead of hanging).
    pub fn run_until_condition(
        &mut self,
        limit_ms: u64,
        condition: impl Fn(&Sim) -> bool,
    ) -> Option<u64> {
        let start = self.now;
        let deadline = start + limit_ms;
        loop {
            if condition(self) {
                return Some(self.now - start);
            }
            match self.next_event_time() {
                Some(at) if at <= deadline => {
                    self.now = self.now.max(at);
                    self.step();
                }
                _ => {
                    self.now = deadline;
                    return condition(self).then_some(self.now - start);
                }
            }
        }
    }
}

type PartialSet = (u32, BTreeMap<u32, Vec<u8>>);

/// The method exactly as first described, for comparison: one version
/// number for the whole data set; a sync request multicasts the version
/// together with the whole set; a receiver with an older version replaces
/// its set with the newer one and stays quiet, a receiver with a newer
/// version starts its own sync request; requests also go out at random
/// intervals and after every local write.
///
/// The whole set travels as numbered chunks of one datagram each; a
/// receiver that misses any chunk of a transfer cannot use it.
pub struct BareMethod {
    node_id: NodeId,
    version: (u64, NodeId),
    data: BTreeMap<String, Vec<u8>>,
    rng: SeededRng,
    next_request: u64,
    interval_ms: u64,
    datagram_bytes_max: usize,
    outbox: Vec<Vec<u8>>,
    /// Writes wait for the current input to end, so a burst of writes goes
    /// out as one request, as gwsync's push coalescing does.
    request_pending: bool,
    /// Transfers being received: (sender, version) -> (chunk count, chunks).
    partial: BTreeMap<(NodeId, u64), PartialSet>,
}

impl BareMethod {
    const HEADER: usize = 8 + 8 + 8 + 4 + 4;

    pub fn new(
        node_id: NodeId,
        seed: u64,
        now: u64,
        interval_ms: u64,
        datagram_bytes_max: usize,
    ) -> BareMethod {
        let mut rng = SeededRng::seed_from_u64(seed);
        let next_request = now + rng.random_range(0..interval_ms.max(1));
        BareMethod {
            node_id,
            version: (0, node_id),
            data: BTreeMap::new(),
            rng,
            next_request,
            interval_ms,
            datagram_bytes_max,
            outbox: Vec::new(),
            request_pending: false,
            partial: BTreeMap::new(),
        }
    }

    /// A factory for the simulator; crashes keep the persisted set.
    pub fn factory(interval_ms: u64, datagram_bytes_max: usize) -> Factory {
        Box::new(move |_, node_id, seed, now, persisted| {
            let mut bare = BareMethod::new(node_id, seed, now, interval_ms, datagram_bytes_max);
            if let Some(persisted) = persisted.filter(|p| !p.blob.is_empty()) {
                bare.load(&persisted.blob);
            }
            Box::new(bare)
        })
    }

    fn encode_set(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (key, value) in &self.data {
            out.extend_from_slice(&(key.len() as u32).to_be_bytes());
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
        out
    }

    fn decode_set(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut data = BTreeMap::new();
        let mut rest = bytes;
        let take = |rest: &mut &[u8]| -> Vec<u8> {
            let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let item = rest[4..4 + len].to_vec();
            *rest = &rest[4 + len..];
            item
        };
        while !rest.is_empty() {
            let key = String::from_utf8(take(&mut rest)).expect("utf-8 key");
            let value = take(&mut rest);
            data.insert(key, value);
        }
        data
    }

    fn load(&mut self, blob: &[u8]) {
        self.version = (
            u64::from_be_bytes(blob[..8].try_into().expect("8 bytes")),
            NodeId(u64::from_be_bytes(blob[8..16].try_into().expect("8 bytes"))),
        );
        self.data = Self::decode_set(&blob[16..]);
    }

    fn request(&mut self) {
        let set = self.encode_set();
        let chunk_len = self.datagram_bytes_max - Self::HEADER;
        let chunks: Vec<&[u8]> = if set.is_empty() {
            vec![&[]]
        } else {
            set.chunks(chunk_len).collect()
        };
        for (index, chunk) in chunks.iter().enumerate() {
            let mut datagram = Vec::with_capacity(Self::HEADER + chunk.len());
            datagram.extend_from_slice(&self.node_id.0.to_be_bytes());
            datagram.extend_from_slice(&self.version.0.to_be_bytes());
            datagram.extend_from_slice(&self.version.1.0.to_be_bytes());
            datagram.extend_from_slice(&(index as u32).to_be_bytes());
            datagram.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
            datagram.extend_from_slice(chunk);
            self.outbox.push(datagram);
        }
    }
}

impl Gateway for BareMethod {
    fn handle_datagram(&mut self, _now: u64, bytes: &[u8]) {
        let field = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let sender = NodeId(field(0));
        let version = (field(8), NodeId(field(16)));
        let index = u32::from_be_bytes(bytes[24..28].try_into().expect("4 bytes"));
        let count = u32::from_be_bytes(bytes[28..32].try_into().expect("4 bytes"));
        if version <= self.version {
            if version < self.version {
                // Method step 4: our data is newer, so we start a request.
                self.request();
            }
            return;
        }
        let (_, chunks) = self
            .partial
            .entry((sender, version.0))
            .or_insert_with(|| (count, BTreeMap::new()));
        chunks.insert(index, bytes[Self::HEADER..].to_vec());
        if chunks.len() as u32 == count {
            let (_, chunks) = self.partial.remove(&(sender, version.0)).expect("present");
            let set: Vec<u8> = chunks.into_values().flatten().collect();
            // Method step 3: take the newer data (all of it) and stay quiet.
            self.data = Self::decode_set(&set);
            self.version = version;
            // Older transfers can get no more chunks (see above), so they
            // never complete; kept, they held up to one copy of the set per
            // sender on every node (gigabytes at N = 128).
            self.partial.retain(|&(_, counter), _| counter >= version.0);
        }
    }

    fn handle_timeout(&mut self, now: u64) {
        if std::mem::take(&mut self.request_pending) {
            self.request();
        }
        if now >= self.next_request {
            self.request();
            let half = self.interval_ms / 2;
            self.next_request = now + half + self.rng.random_range(0..self.interval_ms.max(1));
        }
    }

    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.outbox.is_empty() {
            None
        } else {
            Some(self.outbox.remove(0))
        }
    }

    fn poll_timeout(&self) -> u64 {
        if self.request_pending {
            0
        } else {
            self.next_request
        }
    }

    fn write(&mut self, _now: u64, _wall_ms: u64, key: &str, value: Option<&[u8]>) {
        match value {
            Some(value) => self.data.insert(key.to_owned(), value.to_vec()),
            None => self.data.remove(key),
        };
        self.version = (self.version.0 + 1, self.node_id);
        self.request_pending = true;
    }

    fn trigger(&mut self, _now: u64) {
        self.request();
    }

    fn data(&self) -> BTreeMap<String, Vec<u8>> {
        self.data.clone()
    }

    fn holds(&self, key: &str, value: &[u8]) -> bool {
        self.data.get(key).map(Vec::as_slice) == Some(value)
    }

    fn live_len(&self) -> usize {
        self.data.len()
    }

    fn digest(&self) -> u64 {
        let mut hasher = crate::engine::store::StableHasher::new();
        hasher.write(&self.encode_set());
        hasher.finish()
    }

    fn is_idle(&self) -> bool {
        self.outbox.is_empty() && !self.request_pending
    }

    fn persisted(&self) -> Persisted {
        let mut blob = Vec::new();
        blob.extend_from_slice(&self.version.0.to_be_bytes());
        blob.extend_from_slice(&self.version.1.0.to_be_bytes());
        blob.extend_from_slice(&self.encode_set());
        Persisted {
            node_id: self.node_id,
            blob,
            ..Persisted::default()
        }
    }
}

/// Runs `engines` on a lossless LAN with no delay, starting at `now`:
/// every datagram goes to every other engine, timers fire in time order,
/// until no engine has anything pending but its periodic summary; returns
/// the time reached. For tests that pump engines by hand. A run still busy
/// after `steps_max` rounds (each delivering what was sent, or firing the
/// next timers) fails, naming what was pending, instead of hanging.
pub fn drive_bounded(engines: &mut [Engine], mut now: u64, steps_max: usize) -> u64 {
    for _ in 0..steps_max {
        let mut sent = false;
        for from in 0..engines.len() {
            while let Some(datagram) = engines[from].poll_transmit() {
                sent = true;
                for (to, engine) in engines.iter_mut().enumerate() {
                    if to != from {
                        engine.handle_datagram(now, &datagram);
                    }
                }
            }
        }
        if sent {
            continue;
        }
        if engines.iter().all(Engine::is_idle) {
            return now;
        }
        let next = engines
            .iter()
            .map(Engine::poll_timeout)
            .min()
            .unwrap_or(now);
        now = now.max(next);
        for engine in engines.iter_mut() {
            if engine.poll_timeout() <= now {
                engine.handle_timeout(now);
            }
        }
    }
    let busy: Vec<usize> = (0..engines.len())
        .filter(|&index| !engines[index].is_idle())
        .collect();
    panic!("still busy after {steps_max} steps at {now} ms: engines {busy:?} not idle");
}
