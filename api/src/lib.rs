//! ferry-api: how Ferry's processes talk to each other. The protobufs shared
//! by ferry-control and ferry-agent, the one client [`channel`] to the
//! control plane (TLS and the node's bearer token), and the one HTTP server
//! behind every admin endpoint ([`admin_http`]) that `ferryctl` reads.

pub mod admin_http;
pub mod channel;

pub mod identity {
    tonic::include_proto!("ferry.identity.v1");
}

pub mod discovery {
    tonic::include_proto!("ferry.discovery.v1");
}
