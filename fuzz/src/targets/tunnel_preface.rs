//! The node-to-node tunnel's target: the plain transport's 12-byte preface
//! (`tunnel::decode`, round-tripped through `tunnel::encode`) and the HBONE
//! CONNECT target (`tunnel::hbone::connect_target`, the parse the server
//! uses).

use std::net::SocketAddrV4;

use ferry_agent::tunnel::{decode, encode, hbone::connect_target};

/// One input (the cargo-fuzz target `tunnel_preface` and the replay test call this).
pub fn run(data: &[u8]) {
    if let Ok(b) = <[u8; 12]>::try_from(&data[..data.len().min(12)]) {
        if let Ok(target) = decode(&b) {
            assert_ne!(target.port(), 0);
            assert_eq!(encode(target), b, "preface does not round-trip");
        }
    }
    // What hyper hands the server for `CONNECT <authority> HTTP/2`.
    if let Ok(uri) = hyper::Uri::try_from(data) {
        if let Some(t) = connect_target(&uri) {
            assert_eq!(t.to_string().parse::<SocketAddrV4>().ok(), Some(t));
        }
    }
}
