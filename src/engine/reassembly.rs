//! Reassembly of values too large for one datagram.
//!
//! A fragment names its entry (key and version) and its byte range, so
//! fragments of one entry from different senders (a push, then a repair) fill
//! the same buffer, and a lost fragment is made up by any later copy. Memory
//! is bounded twice: per sender and in total, both checked before a buffer
//! is allocated; an incomplete buffer is dropped after a timeout.
//!
//! Fairness: when the total is reached, a sender holding less than the
//! largest holder gets room by evicting that holder's oldest buffer, so a
//! flood of junk fragments (under many sender ids, in an open group) cannot
//! keep another sender's large value out; it only competes with itself.

use std::collections::BTreeMap;

use super::NodeId;
use super::clock::Version;
use crate::wire::Fragment;

/// Reassembly limits, each with its unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReassemblyLimits {
    pub bytes_max: usize,
    pub bytes_per_sender_max: usize,
    pub timeout_ms: u64,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits {
            bytes_max: 1024 * 1024,
            bytes_per_sender_max: 256 * 1024,
            timeout_ms: 10_000,
        }
    }
}

/// Why a fragment was not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentRejected {
    /// The announced value is larger than the store accepts.
    ValueTooLarge,
    /// Its buffer would pass a reassembly memory limit.
    MemoryFull,
    /// It disagrees with earlier fragments about the total length.
    Inconsistent,
}

struct Partial {
    buffer: Vec<u8>,
    /// Received byte ranges, start -> end, kept merged.
    received: BTreeMap<u32, u32>,
    deadline: u64,
    charged_to: NodeId,
}

impl Partial {
    fn insert(&mut self, offset: u32, chunk: &[u8]) {
        let end = offset + chunk.len() as u32;
        self.buffer[offset as usize..end as usize].copy_from_slice(chunk);
        let mut start = offset;
        let mut stop = end;
        let overlapping: Vec<(u32, u32)> = self
            .received
            .range(..=end)
            .filter(|&(_, &range_end)| range_end >= offset)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.received.remove(&s);
            start = start.min(s);
            stop = stop.max(e);
        }
        self.received.insert(start, stop);
    }

    fn complete(&self) -> bool {
        self.received.get(&0) == Some(&(self.buffer.len() as u32))
    }
}

/// Buffers of partly received large values.
#[derive(Default)]
pub struct Reassembly {
    limits: ReassemblyLimits,
    partials: BTreeMap<(String, Version), Partial>,
    bytes: usize,
    bytes_by_sender: BTreeMap<NodeId, usize>,
    evictions: u64,
}

impl Reassembly {
    pub fn new(limits: ReassemblyLimits) -> Reassembly {
        Reassembly {
            limits,
            ..Reassembly::default()
        }
    }

    /// Buffers evicted so far to make room for a smaller holder.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Bytes currently buffered.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds a fragment; returns the whole value once every byte has arrived.
    pub fn insert(
        &mut self,
        now: u64,
        sender: NodeId,
        fragment: Fragment,
        value_bytes_max: usize,
    ) -> Result<Option<Vec<u8>>, FragmentRejected> {
        let total = fragment.total_len as usize;
        // The decoder checks this too; checking here keeps the buffer
        // arithmetic below safe whoever builds the fragment.
        let end = fragment.offset as u64 + fragment.chunk.len() as u64;
        if fragment.chunk.is_empty() || end > total as u64 {
            return Err(FragmentRejected::Inconsistent);
        }
        if total > value_bytes_max {
            return Err(FragmentRejected::ValueTooLarge);
        }
        let id = (fragment.key, fragment.version);
        if !self.partials.contains_key(&id) {
            let sender_bytes = self.bytes_by_sender.get(&sender).copied().unwrap_or(0);
            if total > self.limits.bytes_max
                || sender_bytes + total > self.limits.bytes_per_sender_max
            {
                return Err(FragmentRejected::MemoryFull);
            }
            while self.bytes + total > self.limits.bytes_max {
                if !self.evict_for(sender_bytes + total) {
                    return Err(FragmentRejected::MemoryFull);
                }
            }
            self.bytes += total;
            *self.bytes_by_sender.entry(sender).or_default() += total;
            self.partials.insert(
                id.clone(),
                Partial {
                    buffer: vec![0; total],
                    received: BTreeMap::new(),
                    deadline: now + self.limits.timeout_ms,
                    charged_to: sender,
                },
            );
        }
        let partial = self.partials.get_mut(&id).expect("inserted above");
        if partial.buffer.len() != total {
            return Err(FragmentRejected::Inconsistent);
        }
        partial.insert(fragment.offset, &fragment.chunk);
        if !partial.complete() {
            return Ok(None);
        }
        let partial = self.partials.remove(&id).expect("present");
        self.release(&partial);
        Ok(Some(partial.buffer))
    }

    /// Evicts the oldest buffer of the largest holder, if that holder has
    /// more than `need` bytes (what the asking sender would hold after its
    /// insert); false when nobody holds more.
    fn evict_for(&mut self, need: usize) -> bool {
        let Some((&largest, &bytes)) = self.bytes_by_sender.iter().max_by_key(|(_, b)| **b) else {
            return false;
        };
        if bytes <= need {
            return false;
        }
        let oldest = self
            .partials
            .iter()
            .filter(|(_, partial)| partial.charged_to == largest)
            .min_by_key(|(_, partial)| partial.deadline)
            .map(|(id, _)| id.clone());
        let Some(partial) = oldest.and_then(|id| self.partials.remove(&id)) else {
            return false;
        };
        self.release(&partial);
        self.evictions += 1;
        true
    }

    fn release(&mut self, partial: &Partial) {
        self.bytes -= partial.buffer.len();
        if let Some(bytes) = self.bytes_by_sender.get_mut(&partial.charged_to) {
            *bytes -= partial.buffer.len();
            if *bytes == 0 {
                self.bytes_by_sender.remove(&partial.charged_to);
            }
        }
    }

    /// Drops buffers past their deadline; returns how many.
    pub fn expire(&mut self, now: u64) -> usize {
        let expired: Vec<(String, Version)> = self
            .partials
            .iter()
            .filter(|(_, partial)| partial.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            let partial = self.partials.remove(id).expect("listed");
            self.release(&partial);
        }
        expired.len()
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.partials.values().map(|partial| partial.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragment(offset: u32, chunk: &[u8], total: u32) -> Fragment {
        Fragment {
            key: "big".into(),
            version: Version::default(),
            total_len: total,
            offset,
            chunk: chunk.to_vec(),
        }
    }

    #[test]
    fn fragments_in_any_order_and_with_duplicates_reassemble() {
        let mut reassembly = Reassembly::new(ReassemblyLimits::default());
        let sender = NodeId(1);
        assert_eq!(
            reassembly.insert(0, sender, fragment(4, b"efgh", 10), 100),
            Ok(None)
        );
        assert_eq!(
            reassembly.insert(0, sender, fragment(4, b"efgh", 10), 100),
            Ok(None)
        );
        assert_eq!(
            reassembly.insert(0, sender, fragment(8, b"ij", 10), 100),
            Ok(None)
        );
        assert_eq!(
            reassembly.insert(0, sender, fragment(0, b"abcd", 10), 100),
            Ok(Some(b"abcdefghij".to_vec()))
        );
        assert_eq!(reassembly.bytes(), 0);
    }

    #[test]
    fn memory_limits_are_checked_before_allocating() {
        let limits = ReassemblyLimits {
            bytes_max: 100,
            bytes_per_sender_max: 60,
            timeout_ms: 1_000,
        };
        let mut reassembly = Reassembly::new(limits);
        assert_eq!(
            reassembly.insert(0, NodeId(1), fragment(0, b"x", 61), 1_000),
            Err(FragmentRejected::MemoryFull)
        );
        assert_eq!(
            reassembly.insert(0, NodeId(1), fragment(0, b"x", 1_000_000), 1_000),
            Err(FragmentRejected::ValueTooLarge)
        );
        assert_eq!(
            reassembly.insert(0, NodeId(1), fragment(0, b"x", 60), 1_000),
            Ok(None)
        );
        assert_eq!(reassembly.bytes(), 60);
    }

    #[test]
    fn a_flood_from_many_senders_cannot_keep_a_smaller_holder_out() {
        let limits = ReassemblyLimits {
            bytes_max: 100,
            bytes_per_sender_max: 60,
            timeout_ms: 1_000,
        };
        let mut reassembly = Reassembly::new(limits);
        let junk = |sender: u64, total: u32| Fragment {
            key: format!("junk{sender}"),
            ..fragment(0, b"x", total)
        };
        assert_eq!(
            reassembly.insert(0, NodeId(7), junk(7, 60), 1_000),
            Ok(None)
        );
        assert_eq!(
            reassembly.insert(1, NodeId(8), junk(8, 40), 1_000),
            Ok(None)
        );
        // Full: another junk sender as large as the largest holder is refused...
        assert_eq!(
            reassembly.insert(2, NodeId(9), junk(9, 60), 1_000),
            Err(FragmentRejected::MemoryFull)
        );
        // ...while a smaller value evicts the largest holder's buffer.
        assert_eq!(
            reassembly.insert(3, NodeId(1), fragment(0, b"ab", 30), 1_000),
            Ok(None)
        );
        assert_eq!(reassembly.evictions(), 1);
        assert_eq!(reassembly.bytes(), 70);
        let mut value = b"ab".to_vec();
        value.extend_from_slice(&[b'c'; 28]);
        assert_eq!(
            reassembly.insert(4, NodeId(2), fragment(2, &[b'c'; 28], 30), 1_000),
            Ok(Some(value))
        );
    }

    #[test]
    fn incomplete_buffers_expire() {
        let mut reassembly = Reassembly::new(ReassemblyLimits::default());
        reassembly
            .insert(0, NodeId(1), fragment(0, b"ab", 4), 100)
            .unwrap();
        assert_eq!(reassembly.next_deadline(), Some(10_000));
        assert_eq!(reassembly.expire(9_999), 0);
        assert_eq!(reassembly.expire(10_000), 1);
        assert_eq!(reassembly.bytes(), 0);
    }
}
