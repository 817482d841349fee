//! Multi-node integration tests for raftbridge: real node processes on loopback.
//!
//! Every test starts its own cluster of `raftbridge node` processes through the harness and
//! talks to them over HTTP and raw TCP only, exactly as an operator would. The tests share ports,
//! CPU and timing-sensitive elections, so they run one at a time (nextest test group, plus a
//! global mutex for plain `cargo test`).

mod harness;
mod http;

mod backup;
mod bad_input;
mod clock;
mod commands;
mod drain;
mod durability;
mod events;
mod failover;
mod formation;
mod https;
mod membership;
mod quorum;
mod replication;
mod sidecar;
mod snapshot;
mod state_store;
mod stores;
