//! ferry-ebpf: Ferry's eBPF side as a library, used by the agent (which
//! loads and drives it) and by `ferryctl` (which reads what is pinned).
//!
//! - the C programs and the one header with every map layout live beside
//!   this crate (`ebpf/ferry.bpf.c`, `ebpf/include/ferry.h`); `build.rs`
//!   compiles them and the object is embedded here ([`object`]);
//! - [`maps`]: the Rust mirrors of those layouts, checked against the
//!   object's BTF (`btf_check`, a test);
//! - [`loader`]: loads the object, attaches and pins per pod ([`Redirector`]);
//! - [`pinned`]: read-only access to a node's pinned maps;
//! - [`events`]: the ring buffer turned into `tracing` events;
//! - [`cgroup`]: finding pod cgroups in a kubelet's layout;
//! - [`preflight`]: can this node run Ferry (`ferryctl check`).

pub mod cgroup;
pub mod events;
pub mod loader;
pub mod maps;
pub mod pinned;
pub mod preflight;

#[cfg(test)]
mod btf_check;

pub use loader::{
    is_bpffs, object, probe_programs, remove_node_pins, OrigDstTable, PodHooks, RedirectError, Redirector,
};
