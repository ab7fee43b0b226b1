# syntax=docker/dockerfile:1
# One image with Ferry's binaries: ferry-agent (the DaemonSet),
# ferry-control (the control plane and CA), ferryctl (run inside the agent's
# pod: `kubectl exec ds/ferry-agent -- ferryctl check`) and ferry-cni (the
# chained CNI plugin, copied onto each node by the agent pod's init
# container). The Helm chart in deploy/daemonset/ runs it.
#
#   docker build -t ghcr.io/ferry-mesh/ferry:0.1.0 .
#
# linux/amd64 only for now: ebpf/build.rs passes clang
# -I/usr/include/x86_64-linux-gnu (asm/types.h for the BPF programs).
# Not built where it was written (no Docker daemon there).

# ---- build: Rust 1.95 (the workspace's rust-version) with clang, llvm and
# libbpf-dev for the eBPF programs in C (ebpf/build.rs compiles them with
# clang -target bpf and embeds the object in the binaries).
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang llvm libbpf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# --locked: exactly Cargo.lock's versions. The caches keep the registry and
# target dir between builds (BuildKit); the binaries are copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ferry-agent -p ferry-control -p ferryctl \
 && mkdir -p /out \
 && install -m 0755 target/release/ferry-agent target/release/ferry-control target/release/ferryctl /out/
# ferry-cni runs on the node itself (the runtime execs it from the host's CNI
# bin dir), against whatever glibc the node has: linked statically (it uses
# no NSS: no name lookups). Checked here with
# `RUSTFLAGS="-C target-feature=+crt-static" cargo build -p ferry-cni --target x86_64-unknown-linux-gnu`
# (`ldd`: statically linked). --target keeps the flag off build scripts.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p ferry-cni --target x86_64-unknown-linux-gnu \
 && install -m 0755 target/x86_64-unknown-linux-gnu/release/ferry-cni /out/

# ---- runtime: Debian 12 slim, the same glibc the binaries were linked
# against (they link glibc dynamically; rustls with aws-lc/ring, no OpenSSL).
# Not distroless: the agent pod's init container fills in the node's name and
# address in its config with sh and sed (deploy/daemonset/templates/agent-daemonset.yaml).
FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="ferry" \
      org.opencontainers.image.description="Ferry: eBPF-accelerated sidecarless service mesh (ferry-agent, ferry-control, ferryctl)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/ /usr/local/bin/
# ferry-control runs as this user (the chart sets runAsUser 65532); the agent
# runs as root with a reduced capability set (deploy/daemonset/README.md).
RUN groupadd --system --gid 65532 ferry \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin ferry
# Ports: 15012 ferry-control gRPC (TLS); the agent is on the host network
# (admin 127.0.0.1:15000, metrics :15020) and listens inside each enrolled pod
# on 15001, 15006 and 15008.
EXPOSE 15012 15020
ENTRYPOINT []
CMD ["/usr/local/bin/ferry-agent", "--help"]
