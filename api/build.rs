//! Compiles the protobufs with protox (pure Rust: no protoc needed).
fn main() {
    let protos = ["proto/ferry/identity.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("valid protobufs");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("generated gRPC code");
}
