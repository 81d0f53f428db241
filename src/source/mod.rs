//! Sources yield committed outbox events in commit order, each with a position that can be acknowledged.
//!
//! `replication` (the default) streams a pgoutput slot; the ack tracker decides which position is safe to
//! confirm. Acknowledgement is the whole crash-safety story: nothing is confirmed before it is recorded.

pub mod ack;
pub mod replication;
pub mod walconn;
