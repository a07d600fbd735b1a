//! Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).
//!
//! Routers boot with a wrong wall clock until NTP runs and often have no RTC,
//! so versions cannot be plain wall-clock times. An HLC timestamp is the
//! largest physical time seen (ours or a peer's) plus a logical counter that
//! orders events within one millisecond. It never goes backwards, even when
//! the wall clock jumps back, and the high-water mark is persisted so a
//! restart with an unset clock still issues newer versions than before.
//!
//! Deviation from the paper: the counter is 16 bits; when it would overflow
//! the physical part is advanced by one millisecond instead, which keeps
//! timestamps unique and monotonic at the cost of running slightly ahead
//! under more than 65,535 events per millisecond.

use super::NodeId;

/// A hybrid logical timestamp packed as `physical_ms << 16 | counter`.
///
/// Packing into one `u64` makes comparison, hashing and the wire format
/// trivial; 48 bits of milliseconds last until the year 10889.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc(pub u64);

impl Hlc {
    pub const ZERO: Hlc = Hlc(0);
    const COUNTER_BITS: u32 = 16;
    const COUNTER_MAX: u64 = (1 << Self::COUNTER_BITS) - 1;
    /// Physical times are clamped to 48 bits so packing never overflows.
    const PHYSICAL_MAX_MS: u64 = (1 << 48) - 1;

    pub fn new(physical_ms: u64, counter: u16) -> Hlc {
        Hlc((physical_ms.min(Self::PHYSICAL_MAX_MS) << Self::COUNTER_BITS) | counter as u64)
    }

    pub fn physical_ms(self) -> u64 {
        self.0 >> Self::COUNTER_BITS
    }

    pub fn counter(self) -> u16 {
        (self.0 & Self::COUNTER_MAX) as u16
    }

    /// The smallest timestamp strictly greater than `self`.
    fn successor(self) -> Hlc {
        if self.counter() as u64 == Self::COUNTER_MAX {
            Hlc::new(self.physical_ms() + 1, 0)
        } else {
            Hlc(self.0 + 1)
        }
    }
}

/// The version of one entry: a total order shared by every gateway.
///
/// Ordered by timestamp, then by origin node id, so two gateways writing one
/// key in the same millisecond still agree on the winner. (A node-id clash
/// from cloned images can produce two equal versions for different values;
/// the store breaks that last tie on the value bytes.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub hlc: Hlc,
    pub origin: NodeId,
}

/// The clock state of one gateway.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    last: Hlc,
}

impl Clock {
    /// Resumes from a persisted high-water mark (or [`Hlc::ZERO`]).
    pub fn resume(high_water: Hlc) -> Clock {
        Clock { last: high_water }
    }

    /// The largest timestamp issued or observed so far; persist it.
    pub fn high_water(&self) -> Hlc {
        self.last
    }

    /// A timestamp for a local event at wall-clock time `wall_ms`, strictly
    /// greater than every timestamp issued or observed before.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        let wall = Hlc::new(wall_ms, 0);
        self.last = if wall > self.last {
            wall
        } else {
            self.last.successor()
        };
        self.last
    }

    /// Takes a timestamp heard from a peer into account, so that the next
    /// local event is ordered after it.
    pub fn observe(&mut self, remote: Hlc) {
        if remote > self.last {
            self.last = remote;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_follows_a_wall_clock_that_moves_forward() {
        let mut clock = Clock::default();
        assert_eq!(clock.tick(1_000), Hlc::new(1_000, 0));
        assert_eq!(clock.tick(2_000), Hlc::new(2_000, 0));
    }

    #[test]
    fn tick_never_goes_back_when_the_wall_clock_jumps_back() {
        let mut clock = Clock::default();
        let before = clock.tick(1_000_000);
        let after_jump = clock.tick(5);
        assert!(after_jump > before);
        assert_eq!(after_jump, Hlc::new(1_000_000, 1));
    }

    #[test]
    fn observe_orders_the_next_local_event_after_a_peer_from_the_future() {
        let mut clock = Clock::default();
        clock.tick(10);
        let remote = Hlc::new(9_000_000, 7);
        clock.observe(remote);
        assert!(clock.tick(11) > remote);
    }

    #[test]
    fn counter_overflow_advances_the_physical_part() {
        let mut clock = Clock::resume(Hlc::new(50, u16::MAX));
        let next = clock.tick(0);
        assert_eq!(next, Hlc::new(51, 0));
    }

    #[test]
    fn resume_issues_timestamps_after_the_persisted_high_water_mark() {
        let mut clock = Clock::resume(Hlc::new(1_700_000_000_000, 3));
        assert!(clock.tick(0) > Hlc::new(1_700_000_000_000, 3));
    }
}
