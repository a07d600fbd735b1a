//! gwsync keeps one shared data set (homes, rooms, scenes, device lists)
//! identical on every IoT gateway of a LAN, over UDP multicast, with no
//! gateway knowing another's address.
//!
//! Layers, from the inside out:
//! - [`engine`]: the sans-IO core. Bytes and time in; datagrams, events and
//!   the next deadline out. Deterministic: no sockets, clock or global RNG.
//! - [`proto`]: the protocol's shared types (node ids, timestamps,
//!   versions), a leaf every other layer builds on.
//! - [`wire`]: the datagram format: a checked view over the header and the
//!   payload codecs.
//! - [`crypto`]: sealing and opening datagrams under the group key, and the
//!   replay window.
//! - [`sim`]: a deterministic multicast LAN simulator that runs many engines
//!   over virtual time with loss, duplication, reordering, delay,
//!   partitions, crashes and skewed clocks.
#![deny(unsafe_code)]

pub mod config;
pub mod control;
pub mod crypto;
pub mod driver;
pub mod engine;
pub mod ffi;
pub mod hex;
pub mod logging;
pub mod net;
pub mod persist;
pub mod proto;
pub mod sim;
#[cfg(feature = "ubus")]
pub mod ubus;
#[cfg(not(feature = "ubus"))]
#[path = "ubus_off.rs"]
pub mod ubus;
pub mod wire;
