//! The protocol's shared vocabulary: node ids, hybrid timestamps, versions
//! and bucket summaries.
//!
//! A leaf module: it imports nothing from the crate, so [`crate::wire`],
//! [`crate::crypto`] and [`crate::engine`] can all build on it without an
//! import cycle (the layers go proto -> wire -> crypto -> engine).
#![deny(unsafe_code)]

use std::fmt;
use std::str::FromStr;

/// A gateway's identity. Persisted, so versions written before a restart
/// still name their origin; random, so no gateway needs configuring.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = std::num::ParseIntError;
    fn from_str(text: &str) -> Result<NodeId, Self::Err> {
        u64::from_str_radix(text, 16).map(NodeId)
    }
}

/// A hybrid logical timestamp packed as `physical_ms << 16 | counter`
/// (see `engine::clock` for the clock that issues them).
///
/// Packing into one `u64` makes comparison, hashing and the wire format
/// trivial; 48 bits of milliseconds last until the year 10889.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc(pub u64);

impl Hlc {
    pub const ZERO: Hlc = Hlc(0);
    /// The largest timestamp: nothing is newer, so a store holding it for a
    /// key can never take a newer local write for that key.
    pub const MAX: Hlc = Hlc(u64::MAX);
    const COUNTER_BITS: u32 = 16;
    const COUNTER_MAX: u64 = (1 << Self::COUNTER_BITS) - 1;
    /// Physical times are clamped to 48 bits so packing never overflows.
    pub const PHYSICAL_MAX_MS: u64 = (1 << 48) - 1;

    pub fn new(physical_ms: u64, counter: u16) -> Hlc {
        Hlc((physical_ms.min(Self::PHYSICAL_MAX_MS) << Self::COUNTER_BITS) | counter as u64)
    }

    pub fn physical_ms(self) -> u64 {
        self.0 >> Self::COUNTER_BITS
    }

    pub fn counter(self) -> u16 {
        (self.0 & Self::COUNTER_MAX) as u16
    }

    /// The smallest timestamp strictly greater than `self`; `None` for
    /// [`Hlc::MAX`], which has none. (Clamping instead would return a
    /// timestamp that is not greater, and a "newer" version that is not.)
    pub fn checked_successor(self) -> Option<Hlc> {
        self.0.checked_add(1).map(Hlc)
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

/// Digest state of one bucket, as exchanged during repair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketSummary {
    pub digest: u64,
    pub count: u32,
    /// The newest timestamp in the bucket: the method's "newer data" test.
    pub max_hlc: Hlc,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_successor_is_the_next_packed_value_and_none_at_the_top() {
        assert_eq!(Hlc::new(5, 1).checked_successor(), Some(Hlc::new(5, 2)));
        assert_eq!(
            Hlc::new(5, u16::MAX).checked_successor(),
            Some(Hlc::new(6, 0))
        );
        assert_eq!(Hlc::MAX.checked_successor(), None);
        assert_eq!(Hlc::new(u64::MAX, 0).physical_ms(), Hlc::PHYSICAL_MAX_MS);
    }

    #[test]
    fn node_ids_print_and_parse_as_16_hex_digits() {
        let id = NodeId(0x00ab_cdef_0123_4567);
        assert_eq!(id.to_string(), "00abcdef01234567");
        assert_eq!("00abcdef01234567".parse::<NodeId>(), Ok(id));
    }
}
