//! ferry-agent: Ferry's per-node agent.
//!
//! eBPF programs (ebpf/, loaded by [`redirect`]) steer an enrolled pod's
//! connections to listeners the agent opens *inside that pod's network
//! namespace* ([`netns`], [`sockets`]); the [`proxy`] forwards them to a local
//! pod, through the [`tunnel`] to another node, or directly. [`agent`] applies
//! the desired state ([`config`] -> [`state`]); [`admin`] and [`telemetry`]
//! show what happened.

pub mod admin;
pub mod agent;
pub mod cgroup;
pub mod config;
pub mod discovery;
pub mod identity;
pub mod netns;
pub mod podnet;
pub mod policy;
pub mod preflight;
pub mod proxy;
pub mod redirect;
pub mod sockets;
pub mod state;
pub mod telemetry;
pub mod tunnel;
