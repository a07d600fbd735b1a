//! The Trickle timer of RFC 6206, which paces the method's sync requests.
//!
//! The method asks every gateway to start sync requests at random intervals
//! and some time after hearing another gateway's. Trickle does exactly that
//! while keeping the whole group's traffic about constant however many
//! gateways there are: within each interval a gateway sends only if it heard
//! fewer than `k` consistent requests, so in steady state about `k` summaries
//! cross the LAN per interval, and the interval doubles up to `Imax` while
//! nothing changes.
//!
//! Deviations from RFC 6206, and why:
//! - Time is milliseconds passed in by the caller (sans-IO), randomness comes
//!   from the engine's seeded RNG, so the simulator replays exactly.
//! - `Imax` is given as a duration rather than a number of doublings; it is
//!   what an operator thinks in.
//! - `reset` when the interval is already `Imin` restarts nothing (RFC 6206
//!   section 4.2 rule 6 says the same); that keeps a burst of inconsistencies
//!   from postponing the transmission forever.

use rand::Rng;

/// Trickle parameters (RFC 6206 section 4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrickleConfig {
    /// Smallest interval, in milliseconds.
    pub imin_ms: u64,
    /// Largest interval, in milliseconds.
    pub imax_ms: u64,
    /// Redundancy constant: send only if fewer than `k` consistent messages
    /// were heard in this interval. `0` means always send.
    pub k: u32,
}

/// One Trickle timer.
#[derive(Clone, Debug)]
pub struct Trickle {
    config: TrickleConfig,
    interval_ms: u64,
    interval_start: u64,
    /// The point `t` within the interval at which to consider sending.
    fire_at: Option<u64>,
    consistent_heard: u32,
}

impl Trickle {
    /// A timer whose first interval starts at `now` with length `Imin`.
    pub fn new(config: TrickleConfig, now: u64, rng: &mut impl Rng) -> Trickle {
        let mut trickle = Trickle {
            config,
            interval_ms: config.imin_ms.max(1),
            interval_start: now,
            fire_at: None,
            consistent_heard: 0,
        };
        trickle.begin_interval(now, rng);
        trickle
    }

    fn begin_interval(&mut self, now: u64, rng: &mut impl Rng) {
        self.interval_start = now;
        self.consistent_heard = 0;
        let half = self.interval_ms / 2;
        self.fire_at = Some(now + half + rng.random_range(0..(self.interval_ms - half).max(1)));
    }

    pub fn interval_ms(&self) -> u64 {
        self.interval_ms
    }

    /// The next time [`Trickle::on_timeout`] must be called.
    pub fn next_deadline(&self) -> u64 {
        self.fire_at
            .unwrap_or(self.interval_start + self.interval_ms)
    }

    /// A message consistent with our state was heard (rule 3).
    pub fn hear_consistent(&mut self) {
        self.consistent_heard = self.consistent_heard.saturating_add(1);
    }

    /// Something inconsistent was heard, or local state changed (rule 6).
    pub fn reset(&mut self, now: u64, rng: &mut impl Rng) {
        if self.interval_ms > self.config.imin_ms {
            self.interval_ms = self.config.imin_ms.max(1);
            self.begin_interval(now, rng);
        }
    }

    /// Advances the timer; returns `true` when the caller should transmit now.
    pub fn on_timeout(&mut self, now: u64, rng: &mut impl Rng) -> bool {
        let mut transmit = false;
        if let Some(fire_at) = self.fire_at {
            if now < fire_at {
                return false;
            }
            self.fire_at = None;
            transmit = self.config.k == 0 || self.consistent_heard < self.config.k;
        }
        if now >= self.interval_start + self.interval_ms {
            self.interval_ms = (self.interval_ms * 2).min(self.config.imax_ms.max(1));
            self.begin_interval(now, rng);
        }
        transmit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    const CONFIG: TrickleConfig = TrickleConfig {
        imin_ms: 100,
        imax_ms: 1_600,
        k: 1,
    };

    /// Runs the timer alone until `until`, returning the transmit times.
    fn run_alone(trickle: &mut Trickle, rng: &mut StdRng, until: u64) -> Vec<u64> {
        let mut sent = Vec::new();
        loop {
            let now = trickle.next_deadline();
            if now > until {
                return sent;
            }
            if trickle.on_timeout(now, rng) {
                sent.push(now);
            }
        }
    }

    #[test]
    fn interval_doubles_up_to_imax_while_alone() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut trickle = Trickle::new(CONFIG, 0, &mut rng);
        let sent = run_alone(&mut trickle, &mut rng, 10_000);
        assert_eq!(trickle.interval_ms(), 1_600);
        // Intervals 100, 200, 400, 800 end at 1500; then one per 1600 ms.
        assert!(sent.len() >= 4 + 5, "sent {sent:?}");
        for pair in sent.windows(2) {
            assert!(pair[1] > pair[0]);
        }
    }

    #[test]
    fn each_transmission_falls_in_the_second_half_of_its_interval() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut trickle = Trickle::new(CONFIG, 0, &mut rng);
        let first = run_alone(&mut trickle, &mut rng, 99);
        assert_eq!(first.len(), 1);
        assert!((50..100).contains(&first[0]), "{first:?}");
    }

    #[test]
    fn hearing_k_consistent_messages_suppresses_the_transmission() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut trickle = Trickle::new(CONFIG, 0, &mut rng);
        trickle.hear_consistent();
        let deadline = trickle.next_deadline();
        assert!(!trickle.on_timeout(deadline, &mut rng));
    }

    #[test]
    fn reset_returns_to_imin_only_from_a_larger_interval() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut trickle = Trickle::new(CONFIG, 0, &mut rng);
        run_alone(&mut trickle, &mut rng, 5_000);
        assert_eq!(trickle.interval_ms(), 1_600);
        trickle.reset(5_000, &mut rng);
        assert_eq!(trickle.interval_ms(), 100);
        let deadline = trickle.next_deadline();
        assert!((5_050..5_100).contains(&deadline));
        trickle.reset(5_010, &mut rng);
        assert_eq!(
            trickle.next_deadline(),
            deadline,
            "reset at Imin must not postpone"
        );
    }
}
