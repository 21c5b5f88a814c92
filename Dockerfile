# The kleingate image. Gateway (no engine: it routes to Verda and the GPU workers; burn is neither
# compiled nor linked, see docs/operations.md):   docker build -t ghcr.io/kleingate/kleingate:0.1.0 .
# A CPU engine: --build-arg FEATURES=local.
# GPU worker (local engine on Vulkan):  docker build --build-arg FEATURES=vulkan \
#   --build-arg RUNTIME_PACKAGES="ca-certificates libvulkan1" -t ghcr.io/kleingate/kleingate-gpu:0.1.0 .
# (the NVIDIA container toolkit mounts the driver's Vulkan ICD when NVIDIA_DRIVER_CAPABILITIES
# includes `graphics`, as k8s/base/gpu-worker-deployment.yaml sets). Not built in CI.
FROM rust:1.95-bookworm AS build
ARG FEATURES=""
WORKDIR /src
COPY . .
RUN if [ -n "$FEATURES" ]; then set -- --features "$FEATURES"; else set -- --no-default-features; fi \
 && cargo build --release --locked -p kleingate-gateway --bin kleingate "$@" \
 && strip target/release/kleingate

FROM debian:bookworm-slim
ARG RUNTIME_PACKAGES="ca-certificates"
RUN apt-get update \
 && apt-get install -y --no-install-recommends $RUNTIME_PACKAGES \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kleingate /usr/local/bin/kleingate
COPY gateway/kleingate.example.toml /etc/kleingate/kleingate.example.toml
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["kleingate"]
CMD ["serve", "--config", "/etc/kleingate/kleingate.toml"]
