//! Compiles the protobufs with protox (pure Rust: no protoc needed).
fn main() {
    let protos = ["proto/ferry/identity.proto", "proto/ferry/discovery.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("valid protobufs");
    tonic_prost_build::configure()
        // Ordered maps: encodings (and so resource versions) are deterministic.
        .btree_map(".")
        .compile_fds(fds)
        .expect("generated gRPC code");
}
