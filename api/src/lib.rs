//! Ferry's protobufs, shared by ferry-control and ferry-agent.

pub mod identity {
    tonic::include_proto!("ferry.identity.v1");
}

pub mod discovery {
    tonic::include_proto!("ferry.discovery.v1");
}
