#!/usr/bin/env bash
# Load test on loopback: builds dispatchd (release), starts `serve` on the embedded defaults
# (every message logged at info — filtered out here with DISPATCHD_LOG=warn — appended to a JSONL
# file with group commit, and forwarded as a dispatch event to the file sink) in a temporary
# directory, runs `dispatchd loadtest` against it, and stops it.
#
#   scripts/loadtest.sh                      # steps of 10 s at 5k, 10k, 20k, 30k messages/s
#   RATES=10000 STEP=300s scripts/loadtest.sh   # a 5-minute soak at 10k/s (memory flat?)
#
# Bounded: each step lasts STEP; the server is killed on exit whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

RATES="${RATES:-5000,10000,20000,30000}"
STEP="${STEP:-10s}"
CONNECTIONS="${CONNECTIONS:-64}"

cargo build --release --quiet
binary="$PWD/target/release/dispatchd"
work="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

cd "$work"
DISPATCHD_LISTEN="127.0.0.1:$port" DISPATCHD_LOG=warn "$binary" serve > "$work/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT

for _ in $(seq 100); do
  "$binary" health --url "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.1
done
if ! "$binary" health --url "http://127.0.0.1:$port/health"; then
  echo "dispatchd serve did not start; its log:" >&2
  tail -n 20 "$work/serve.log" >&2
  exit 1
fi

# loadtest says what went wrong (errors by status, "every answer was 400: check the topic");
# serve's own log says why, when it failed.
if ! "$binary" loadtest --target "http://127.0.0.1:$port" --rates "$RATES" --step "$STEP" \
  --connections "$CONNECTIONS" --pid "$server"; then
  echo "the last lines of serve's log:" >&2
  tail -n 20 "$work/serve.log" >&2
  exit 1
fi
echo "messages written: $(wc -l < "$work/dispatchd-data/messages.jsonl")"
