//! Compiles ferry-workload's gRPC test service (`proto/echo.proto`) with
//! protox (pure Rust: no protoc needed), as `api/build.rs` does.
fn main() {
    let protos = ["proto/echo.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("valid protobufs");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("generated gRPC code");
}
