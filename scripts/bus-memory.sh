#!/usr/bin/env bash
# Redis memory under a steady events stream: RATE events/s for DURATION seconds onto a stream that
# one `dispatchd sink` (file) consumes, on a redis-server of our own; prints used_memory and XLEN
# every 5 s. TRIM_EVERY is the sink's --trim-every (set it to 1000h to see the stream without
# trimming). Numbers go in docs/benchmarks.md. Not part of the test suite (it takes a minute).
#
#   scripts/bus-memory.sh                       # 3,000/s for 60 s, trimming every second
#   TRIM_EVERY=1000h DURATION=20 scripts/bus-memory.sh
set -euo pipefail
RATE=${RATE:-3000}
DURATION=${DURATION:-60}
TRIM_EVERY=${TRIM_EVERY:-1s}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/debug/dispatchd}
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
DIR=$(mktemp -d)
STREAM=bus-memory:events

redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
  >"$DIR/redis.log" 2>&1 &
REDIS=$!
SINK=
cleanup() {
  [ -n "$SINK" ] && kill "$SINK" 2>/dev/null || true
  kill "$REDIS" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
for _ in $(seq 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

# One second of events as RESP XADD commands, written once (a realistic ~600-byte event).
python3 - "$RATE" "$STREAM" >"$DIR/second.resp" <<'PY'
import json, sys
rate, stream = int(sys.argv[1]), sys.argv[2]
event = json.dumps({"type": "chain", "event": "end", "runId": "0" * 36, "parentRunId": None,
    "name": "shop.orders.events", "timestamp": "2026-12-02T21:00:00.000Z",
    "input": {"message_type": "order.placed", "payload": {"order": 1234, "items": ["a"] * 20}},
    "output": {"status": "success"}, "userId": None, "tokensUsage": None,
    "metadata": {"category": "event", "dispatchers": ["jsonl"]}, "tags": ["event"],
    "log_id": "0" * 36})
def resp(*args):
    out = f"*{len(args)}\r\n"
    for arg in args:
        out += f"${len(arg.encode())}\r\n{arg}\r\n"
    return out
sys.stdout.write(resp("XADD", stream, "*", "data", event) * rate)
PY

"$BIN" sink --service file --endpoint "$DIR/out.jsonl" --dead-letter "$DIR/dead.jsonl" \
  --bus "redis://127.0.0.1:$PORT" --stream "$STREAM" --consumer bus-memory \
  --batch-size 500 --buffer 5000 --flush-interval 100ms --trim-every "$TRIM_EVERY" \
  --listen 127.0.0.1:0 >"$DIR/sink.log" 2>&1 &
SINK=$!

echo "rate=$RATE/s duration=${DURATION}s trim_every=$TRIM_EVERY"
echo "t_s used_memory_bytes xlen delivered"
start=$(date +%s.%N)
for second in $(seq 0 "$DURATION"); do
  if (( second % 5 == 0 )); then
    used=$(redis-cli -p "$PORT" info memory | tr -d '\r' | awk -F: '$1=="used_memory"{print $2}')
    len=$(redis-cli -p "$PORT" xlen "$STREAM")
    lines=0
    [ -f "$DIR/out.jsonl" ] && lines=$(wc -l <"$DIR/out.jsonl")
    echo "$second $used $len $lines"
  fi
  (( second == DURATION )) && break
  redis-cli -p "$PORT" --pipe <"$DIR/second.resp" >/dev/null
  # Paced to one batch per wall-clock second.
  next=$(echo "$start + $second + 1" | bc)
  now=$(date +%s.%N)
  pause=$(echo "$next - $now" | bc)
  if (( $(echo "$pause > 0" | bc) )); then sleep "$pause"; fi
done
