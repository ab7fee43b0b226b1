//! ferry-bench: what Ferry costs and what it does, shown on the
//! cluster-in-a-box (`ferry-box`, the harness it drives): the data-path
//! benchmarks ([`bench`], with its HTTP rows in [`bench_http`]: wrk and
//! h2load through Ferry's L4 and L7 paths), the control plane at scale
//! ([`bench_control`]), authorization decisions with 10,000 policies
//! ([`bench_authz`]), the standard tools (iperf3, sockperf: [`bench_std`]) and the narrated demo ([`demo`]). `cargo xtask bench` and `cargo xtask demo`
//! build everything and run the `ferry-bench` binary. The soak ([`soak`],
//! `cargo xtask soak`): sustained mixed load with config churn and an agent
//! handover on one box, every failure counted, agent memory followed.

pub mod bench;
pub mod bench_authz;
pub mod bench_control;
pub mod bench_http;
pub mod bench_lb;
pub mod bench_std;
pub mod demo;
pub mod soak;
