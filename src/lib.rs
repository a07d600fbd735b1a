//! gwsync: keeps one shared data set identical on every IoT gateway of a LAN.
pub mod engine;
