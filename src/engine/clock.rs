//! Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks and
//! Consistent Snapshots in Globally Distributed Databases", 2014), with a
//! bound on what peers may tell it.
//!
//! Routers boot with a wrong wall clock until NTP runs and often have no RTC,
//! so versions cannot be plain wall-clock times. An HLC timestamp is the
//! largest physical time seen (ours or a peer's) plus a logical counter that
//! orders events within one millisecond, packed into a [`Hlc`].
//!
//! # The bound on remote clocks
//!
//! The paper's receive rule takes any remote timestamp (`l = max(l, l_m,
//! pt)`) and assumes clocks drift by at most epsilon; it suggests ignoring
//! messages from further ahead, but leaves that to the deployment. gwsync
//! cannot assume it: one peer with a wrong clock, or one forged datagram,
//! would otherwise move every gateway's clock (and every later version)
//! anywhere, up to the largest timestamp, after which no key could be
//! written again. So:
//!
//! - **Rule.** A timestamp heard from a peer (a summary's clock, an entry's
//!   or fragment's version, a bucket's newest version) is used only if it is
//!   at most `clock_ahead_max_ms` (default 5 minutes) past this gateway's
//!   own physical clock ([`remote_limit`]). Anything further ahead is
//!   refused and counted (`clock_ahead` for summaries and digests,
//!   `version_ahead` for entries and fragments), never merged, and moves
//!   nothing. A peer can therefore push our clock at most
//!   `clock_ahead_max_ms` past our physical time, whatever it sends.
//! - **Why minutes.** NTP keeps routers within milliseconds of each other;
//!   minutes tolerate a router whose clock drifted for weeks without NTP,
//!   while keeping what a liar can do small: versions at most minutes in the
//!   future, which real time catches up with.
//! - **An honest gateway whose clock is behind** (no RTC, before NTP) simply
//!   refuses the group's newer entries for now (they are counted, not lost:
//!   the group still holds them) and keeps issuing versions from its own
//!   clock for its writes, which the group accepts (there is no bound into
//!   the past). Once its clock is set the next repair brings it the rest.
//!   Its writes are never refused by the group, but under last-writer-wins
//!   they lose to a write the group made at a later timestamp.
//! - **An honest gateway whose clock is ahead** has its writes refused by
//!   the others until real time reaches their versions. When its clock is
//!   set back further than the bound, [`Clock::tick`] starts again from the
//!   physical clock instead of the old high-water mark (a deviation from the
//!   paper, whose `l` never decreases): per key, a local write still gets a
//!   version newer than the one stored (the engine takes the successor of the
//!   stored version when that is larger), which is the order
//!   last-writer-wins needs; order across different keys is what is given up,
//!   and only after a clock jump the paper does not allow either.
//!   Entries it took while ahead that now lie beyond the bound are
//!   forgotten by the engine (its own among them: written again at their
//!   old value they could beat later writes of others), and a local write
//!   replaces such an entry rather than following it, so it does not stay
//!   split from the group until real time reaches them.
//!
//! Tombstone lifetimes are measured against the physical clock, not this
//! clock, so no peer can make tombstones expire early (store.rs).
//!
//! Deviation from the paper: the counter is 16 bits; when it would overflow
//! the physical part is advanced by one millisecond instead, which keeps
//! timestamps unique and monotonic at the cost of running slightly ahead
//! under more than 65,535 events per millisecond.

pub use crate::proto::{Hlc, Version};

/// The newest remote timestamp a gateway accepts when its physical clock
/// reads `physical_ms`.
pub fn remote_limit(physical_ms: u64, clock_ahead_max_ms: u64) -> Hlc {
    Hlc::new(physical_ms.saturating_add(clock_ahead_max_ms), u16::MAX)
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

    /// A timestamp for a local event at wall-clock time `wall_ms`: strictly
    /// greater than every timestamp issued or observed before, unless that
    /// high-water mark is more than `ahead_max_ms` past the wall clock (see
    /// the module doc), in which case the clock restarts from `wall_ms`.
    pub fn tick(&mut self, wall_ms: u64, ahead_max_ms: u64) -> Hlc {
        let wall = Hlc::new(wall_ms, 0);
        let successor = self.last.checked_successor();
        self.last = match successor {
            Some(next) if next > wall && next <= remote_limit(wall_ms, ahead_max_ms) => next,
            _ => wall,
        };
        self.last
    }

    /// Takes a timestamp into account (one the caller has checked against
    /// [`remote_limit`], or one of our own), so that the next local event is
    /// ordered after it.
    pub fn observe(&mut self, timestamp: Hlc) {
        if timestamp > self.last {
            self.last = timestamp;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AHEAD_MAX_MS: u64 = 300_000;

    #[test]
    fn tick_follows_a_wall_clock_that_moves_forward() {
        let mut clock = Clock::default();
        assert_eq!(clock.tick(1_000, AHEAD_MAX_MS), Hlc::new(1_000, 0));
        assert_eq!(clock.tick(2_000, AHEAD_MAX_MS), Hlc::new(2_000, 0));
    }

    #[test]
    fn tick_never_goes_back_when_the_wall_clock_jumps_back_within_the_bound() {
        let mut clock = Clock::default();
        let before = clock.tick(1_000_000, AHEAD_MAX_MS);
        let after_jump = clock.tick(1_000_000 - AHEAD_MAX_MS + 1, AHEAD_MAX_MS);
        assert!(after_jump > before);
        assert_eq!(after_jump, Hlc::new(1_000_000, 1));
    }

    #[test]
    fn tick_restarts_from_the_wall_clock_after_a_jump_back_past_the_bound() {
        let mut clock = Clock::resume(Hlc::new(9_000_000_000, 3));
        assert_eq!(clock.tick(5_000, AHEAD_MAX_MS), Hlc::new(5_000, 0));
        assert_eq!(clock.tick(5_000, AHEAD_MAX_MS), Hlc::new(5_000, 1));
    }

    #[test]
    fn observe_orders_the_next_local_event_after_a_peer_within_the_bound() {
        let mut clock = Clock::default();
        clock.tick(10_000, AHEAD_MAX_MS);
        let remote = remote_limit(10_000, AHEAD_MAX_MS);
        clock.observe(remote);
        assert!(clock.tick(10_001, AHEAD_MAX_MS) > remote);
    }

    #[test]
    fn counter_overflow_advances_the_physical_part() {
        let mut clock = Clock::resume(Hlc::new(50, u16::MAX));
        let next = clock.tick(0, AHEAD_MAX_MS);
        assert_eq!(next, Hlc::new(51, 0));
    }

    #[test]
    fn the_largest_timestamp_cannot_wedge_the_clock() {
        let mut clock = Clock::resume(Hlc::MAX);
        assert_eq!(clock.tick(1_000, AHEAD_MAX_MS), Hlc::new(1_000, 0));
    }

    #[test]
    fn resume_issues_timestamps_after_a_recent_persisted_high_water_mark() {
        let mark = Hlc::new(1_700_000_000_000, 3);
        let mut clock = Clock::resume(mark);
        assert!(clock.tick(1_700_000_000_000 - 60_000, AHEAD_MAX_MS) > mark);
    }
}
