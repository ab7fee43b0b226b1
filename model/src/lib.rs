//! ferry-model: the types and decisions every Ferry process shares, with no
//! I/O and no runtime: workloads, pods still without an address (and what an
//! agent does with the address the runtime gives one: [`pending`]), services
//! (with each port's protocol), peer-authentication policy, access-log
//! policy, SPIFFE ids, the agent's config and its validation, the state
//! store and its route decision, and the agent's admin views. With the
//! `proto` feature, the conversions to and from the control plane's wire
//! messages ([`proto`]).
//!
//! Routes and authorization rules belong here too, with their decisions as
//! pure functions over [`state::State`].

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod authz;
pub mod balance;
pub mod cni;
pub mod config;
#[cfg(test)]
mod fuzz_regressions;
pub mod peer_auth;
pub mod pending;
#[cfg(test)]
mod proptests;
#[cfg(feature = "proto")]
pub mod proto;
pub mod protocol;
pub mod ratelimit;
pub mod route;
pub mod spiffe;
pub mod state;
pub mod traffic;
pub mod workload;
pub mod yaml;

pub use config::{ConfigError, ConfigFile, Settings};
pub use protocol::Protocol;
pub use spiffe::SpiffeId;
pub use workload::{Endpoint, PendingPod, Service, ServicePort, Workload};
