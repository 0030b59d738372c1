# Build: the release binary in the official Rust image; run: a slim Debian with only the binary,
# as an unprivileged user. The HEALTHCHECK probes /health with the binary itself (`dispatchd
# health`): the image has no curl. Checked by tests/it/packaging.rs.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin dispatchd

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 dispatchd \
    && useradd --system --uid 10001 --gid dispatchd --home-dir /var/lib/dispatchd --shell /usr/sbin/nologin dispatchd \
    && install -d -o dispatchd -g dispatchd -m 0750 /var/lib/dispatchd
COPY --from=build /src/target/release/dispatchd /usr/local/bin/dispatchd
USER 10001:10001
WORKDIR /var/lib/dispatchd
ENV DISPATCHD_LISTEN=0.0.0.0:9000
EXPOSE 9000
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["dispatchd", "health", "--url", "http://127.0.0.1:9000/health", "--timeout", "3s"]
# SIGTERM drains (docs/health.md); `docker stop` waits 10 s by default: use `--time 50`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dispatchd"]
CMD ["serve"]
