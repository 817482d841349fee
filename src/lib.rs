//! raftbridge: every instance of an application embeds a Raft-replicated broker and state store
//! (openraft) and a load-balancing reverse proxy (hyper). See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

pub mod api;
pub mod backup;
pub mod broker;
pub mod bench;
pub mod chaos;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod fsutil;
pub mod node;
pub mod peer;
pub mod process;
pub mod proxy;
pub mod raft;
pub mod sdk;
pub mod sidecar;
pub mod store;
pub mod supervise;

/// Locks a std mutex, going on if it is poisoned. Every mutex in this crate guards maps, queues
/// or plain values that stay valid between statements, so a panic elsewhere while one was held
/// leaves nothing half-updated to refuse.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
