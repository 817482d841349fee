//! raftbridge: every instance of an application embeds a Raft-replicated broker and state store
//! (openraft) and a load-balancing reverse proxy (hyper). See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

pub mod api;
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
