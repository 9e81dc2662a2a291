# The one image of Hypha on Kubernetes: `hypha` with its subcommands (the control plane, the
# injected `istio-init` capture step and `istio-proxy` sidecar, the node agent). Its
# entrypoint is `hypha`; manifests and injected containers give only the subcommand.
#
#   docker build -t hypha:0.1.0 .
#
# Build: the Rust toolchain Hypha supports and what BoringSSL and the eBPF programs need.
FROM rust:1.95-bookworm AS build
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends cmake clang libclang-dev linux-libc-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p hypha && cp target/release/hypha /hypha

# Run: iptables (the nftables backend, as the capture step uses it) and iproute2, nothing else.
FROM debian:bookworm-slim
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ca-certificates iptables iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /hypha /usr/local/bin/hypha
# The sidecar's user and group (the capture leaves group 1337's traffic alone).
RUN groupadd --gid 1337 istio-proxy && useradd --uid 1337 --gid 1337 --no-create-home istio-proxy
ENTRYPOINT ["/usr/local/bin/hypha"]
