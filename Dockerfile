# Build: the release binary in the official Rust image; run: a slim Debian with only the binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin dispatchd

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/dispatchd /usr/local/bin/dispatchd
WORKDIR /var/lib/dispatchd
ENV DISPATCHD_LISTEN=0.0.0.0:9000
EXPOSE 9000
ENTRYPOINT ["dispatchd"]
CMD ["serve"]
