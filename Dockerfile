# The ordinary path, for machines WITH registry access: build the static binary in the
# official Rust image, ship it in an empty image. The offline path (docker/prebuilt.Dockerfile)
# produces the same layout from a binary built on the host; docker-compose.yml picks one
# through GATEWAY_DOCKERFILE (see README.md, "Running with Docker").
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY assets ./assets
# Cargo.toml declares the benches and the benchmark's floor proxy (an example), and cargo
# refuses a manifest whose declared targets are missing, even to build only the binary
# (tests/ops/dockerfile.rs keeps this list complete).
COPY benches ./benches
COPY loadtest/floor ./loadtest/floor
COPY loadtest/ws-relay.d ./loadtest/ws-relay.d
# Static glibc build: the result runs in FROM scratch (no loader, no libc in the image).
ENV RUSTFLAGS="-C target-feature=+crt-static"
RUN cargo build --release --locked --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/release/deltastream-gateway /deltastream-gateway

FROM scratch
COPY --from=build /deltastream-gateway /usr/local/bin/deltastream-gateway
# https:// upstreams go through rustls, which needs a root store.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/usr/local/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65534:65534
EXPOSE 8000 9000
HEALTHCHECK --interval=5s --timeout=3s --retries=3 \
  CMD ["/usr/local/bin/deltastream-gateway", "probe", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["/usr/local/bin/deltastream-gateway"]
CMD ["serve"]
