//! Fragment reassembly under a stream of arbitrary fragments from a few
//! senders, with time passing: never panics, stays within its memory limits,
//! and every value it completes matches a simple model of the writes.
//!
//! Fragments go through the wire encoder and parser first, so they hold
//! exactly the invariants a received fragment holds (non-empty chunk inside
//! the total length); Reassembly::insert relies on them.
#![no_main]

use std::collections::BTreeMap;

use gwsync::engine::NodeId;
use gwsync::engine::clock::{Hlc, Version};
use gwsync::engine::reassembly::{FragmentRejected, Reassembly, ReassemblyLimits};
use gwsync::wire::{Fragment, Message, MessageType};
use libfuzzer_sys::fuzz_target;

const LIMITS: ReassemblyLimits = ReassemblyLimits {
    bytes_max: 4096,
    bytes_per_sender_max: 2048,
    timeout_ms: 100,
};
const VALUE_BYTES_MAX: usize = 3000;

struct Model {
    buffer: Vec<u8>,
    received: Vec<bool>,
    deadline: u64,
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut reassembly = Reassembly::new(LIMITS);
    let mut models: BTreeMap<(String, Version), Model> = BTreeMap::new();
    let mut now = 0u64;
    while let Some(op) = input.u8() {
        if op & 3 == 3 {
            now += u64::from(op >> 2) * 4;
            let expired = reassembly.expire(now);
            let before = models.len();
            models.retain(|_, model| model.deadline > now);
            assert_eq!(expired, before - models.len());
            continue;
        }
        let (Some(sender), Some(ids), Some(total), Some(offset), Some(len), Some(fill)) = (
            input.u8(),
            input.u8(),
            input.u16(),
            input.u16(),
            input.u8(),
            input.u8(),
        ) else {
            break;
        };
        // Few senders, keys and versions, so fragments meet in one buffer.
        let sender = NodeId(u64::from(sender % 3));
        let key = format!("k{}", ids % 3);
        let version = Version {
            hlc: Hlc(u64::from((ids >> 2) & 1)),
            origin: NodeId(1),
        };
        let chunk: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i)).collect();
        let fragment = Fragment {
            key,
            version,
            total_len: u32::from(total % 4000),
            offset: u32::from(offset % 4000),
            chunk,
        };
        let mut payload = Vec::new();
        Message::Fragment(fragment).emit_payload(&mut payload);
        let Ok(Message::Fragment(fragment)) =
            Message::parse_payload(MessageType::Fragment, &payload)
        else {
            continue;
        };
        let id = (fragment.key.clone(), fragment.version);
        let (start, total) = (fragment.offset as usize, fragment.total_len as usize);
        let chunk = fragment.chunk.clone();
        let result = reassembly.insert(now, sender, fragment, VALUE_BYTES_MAX);
        assert!(reassembly.bytes() <= LIMITS.bytes_max);
        match result {
            Err(FragmentRejected::ValueTooLarge) => assert!(total > VALUE_BYTES_MAX),
            Err(FragmentRejected::MemoryFull) => assert!(!models.contains_key(&id)),
            Err(FragmentRejected::Inconsistent) => {
                assert_ne!(models.get(&id).map(|model| model.buffer.len()), Some(total));
            }
            Ok(done) => {
                let model = models.entry(id.clone()).or_insert_with(|| Model {
                    buffer: vec![0; total],
                    received: vec![false; total],
                    deadline: now + LIMITS.timeout_ms,
                });
                model.buffer[start..start + chunk.len()].copy_from_slice(&chunk);
                model.received[start..start + chunk.len()].fill(true);
                let complete = model.received.iter().all(|&byte| byte);
                assert_eq!(done.is_some(), complete);
                if let Some(value) = done {
                    assert_eq!(value, model.buffer);
                    models.remove(&id);
                }
            }
        }
        let modelled: usize = models.values().map(|model| model.buffer.len()).sum();
        assert_eq!(reassembly.bytes(), modelled);
    }
    reassembly.expire(u64::MAX);
    assert_eq!(reassembly.bytes(), 0);
});
