#!/usr/bin/env bash
# HTTP ingest against the framework's floor (issue 19), on loopback.
#
# Builds (release) dispatchd and examples/floor.rs (a minimal axum 0.8 server that parses the
# same JSON body and answers a small JSON), then for ROUNDS interleaved rounds runs wrk against,
# in turn: the floor; dispatchd with one no-op route (a `log` dispatcher whose lines the log
# filter drops, no sinks); dispatchd on the embedded default config (every message logged at
# info, which DISPATCHD_LOG=warn filters out as scripts/loadtest.sh does, appended to
# messages.jsonl with group commit, its event forwarded to the file sink). Each server is pinned
# to SERVER_CPUS and wrk to LOAD_CPUS, and started fresh in an empty directory for each run.
# Prints each run's requests/s and wrk's p99, then per variant the median and its share of the
# floor's median, with the server's CPU time per request (user + system, from /proc) and the
# floor's CPU per request over it: a share that moves much less with the machine's load. Last,
# the default config at half its median ceiling, a fixed rate with `dispatchd loadtest` (open
# loop, latency from when each request was due): its p99.
#
#   scripts/http-bench.sh                         # 5 rounds of 10 s, 32 connections
#   ROUNDS=3 DURATION=5s scripts/http-bench.sh
#   SERVER_CPUS=0-3 LOAD_CPUS=4-7 WRK_THREADS=4 scripts/http-bench.sh
#   DISPATCHD_BIN=/path/to/other/dispatchd scripts/http-bench.sh   # compare another build
#
# Needs: wrk (Debian: apt-get install wrk), taskset (util-linux), curl, python3.
# Bounded: each run lasts DURATION; every server is killed on exit whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-32}"
WRK_THREADS="${WRK_THREADS:-1}"
SERVER_CPUS="${SERVER_CPUS:-0}"
LOAD_CPUS="${LOAD_CPUS:-1}"
HALF_STEP="${HALF_STEP:-10s}"

missing=()
for tool in wrk taskset curl python3; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "http-bench: missing ${missing[*]} (Debian: apt-get install -y wrk util-linux curl python3)" >&2
  exit 2
fi

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --quiet --bin dispatchd --example floor
binary="${DISPATCHD_BIN:-$target_dir/release/dispatchd}"
floor="$target_dir/release/examples/floor"

work="$(mktemp -d)"
server=""
stop() {
  if [[ -n "$server" ]]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
  fi
}
trap 'stop; rm -rf "$work"' EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The same body for every server: a small order with one secret for the redactor to mask.
cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"message_type":"order.placed","payload":{"order_id":"o-1842","amount":129.5,"currency":"EUR","items":[{"sku":"A-7","qty":2},{"sku":"B-3","qty":1}],"customer":{"id":"c-77","email":"ana@example.com","api_key":"sk_live_abc123"}},"headers":{"user_id":"c-77"}}'
LUA

cat > "$work/noop.toml" <<'TOML'
sinks = []
[[dispatchers]]
dispatcher_id = "log"
kind = "log"
category = "event"
[[routes]]
route_id = "events-to-log"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "log"
TOML

# start VARIANT PORT: starts the server in a fresh directory; waits until it answers.
start() {
  local variant="$1" port="$2" dir="$work/run-$1"
  rm -rf "$dir" && mkdir -p "$dir"
  case "$variant" in
    floor)
      (cd "$dir" && exec taskset -c "$SERVER_CPUS" "$floor" "127.0.0.1:$port") > "$dir/server.log" 2>&1 &
      ;;
    noop)
      (cd "$dir" && DISPATCHD_LISTEN="127.0.0.1:$port" DISPATCHD_LOG=warn \
        exec taskset -c "$SERVER_CPUS" "$binary" --config "$work/noop.toml" serve) > "$dir/server.log" 2>&1 &
      ;;
    default)
      (cd "$dir" && DISPATCHD_LISTEN="127.0.0.1:$port" DISPATCHD_LOG=warn \
        exec taskset -c "$SERVER_CPUS" "$binary" serve) > "$dir/server.log" 2>&1 &
      ;;
  esac
  server=$!
  local body='{"message_type":"warmup","payload":{}}'
  for _ in $(seq 200); do
    curl -fs -o /dev/null -H 'content-type: application/json' -d "$body" \
      "http://127.0.0.1:$port/api/v1/messages/bench.events" && return 0
    kill -0 "$server" 2>/dev/null || break
    sleep 0.05
  done
  echo "http-bench: $variant did not start:" >&2
  cat "$dir/server.log" >&2
  exit 1
}

# The server's CPU time so far, user and system, in clock ticks.
cpu_ticks() {
  awk '{print $14, $15}' "/proc/$server/stat"
}

# run VARIANT: one wrk run; prints "requests/s p99_ms user_us_per_request sys_us_per_request".
run() {
  local variant="$1" port
  port="$(free_port)"
  start "$variant" "$port"
  local out before after
  before="$(cpu_ticks)"
  out="$(taskset -c "$LOAD_CPUS" wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency \
    -s "$work/post.lua" "http://127.0.0.1:$port/api/v1/messages/bench.events")"
  after="$(cpu_ticks)"
  local lines=-1
  if [[ "$variant" == default ]]; then
    # Every answered message reached the file before its 200 (the appender's promise).
    lines="$(wc -l < "$work/run-default/dispatchd-data/messages.jsonl")"
  fi
  stop
  if grep -q "Non-2xx" <<<"$out"; then
    echo "http-bench: $variant answered errors:" >&2
    echo "$out" >&2
    exit 1
  fi
  python3 - "$out" "$lines" "$before" "$after" "$(getconf CLK_TCK)" <<'PY'
import re, sys
out, lines = sys.argv[1], int(sys.argv[2])
(user0, sys0), (user1, sys1) = (map(int, t.split()) for t in sys.argv[3:5])
tick_us = 1e6 / int(sys.argv[5])
answered = int(re.search(r"(\d+) requests in", out).group(1))
if lines >= 0 and lines < answered:
    sys.exit(f"http-bench: {answered} messages answered but only {lines} lines in messages.jsonl")
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
# CPU per request moves much less than requests/s when other processes share the machine.
print(f"{rps:.0f} {p99:.2f} {(user1 - user0) * tick_us / answered:.1f} {(sys1 - sys0) * tick_us / answered:.1f}")
PY
}

echo "load: $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min) on $(nproc) CPUs; server on CPUs $SERVER_CPUS, wrk on $LOAD_CPUS"
echo "wrk: $WRK_THREADS thread(s), $CONNECTIONS connections, $DURATION per run, $ROUNDS interleaved rounds"
declare -A results cpu
for round in $(seq "$ROUNDS"); do
  for variant in floor noop default; do
    run "$variant" > "$work/result"
    read -r rps p99 user sys < "$work/result"
    results[$variant]+="$rps "
    cpu[$variant]+="$user/$sys "
    printf 'round %d  %-8s %8s req/s  p99 %7s ms  server CPU per request %5s µs user + %5s µs sys\n' \
      "$round" "$variant" "$rps" "$p99" "$user" "$sys"
  done
done

python3 - "${results[floor]}" "${results[noop]}" "${results[default]}" \
  "${cpu[floor]}" "${cpu[noop]}" "${cpu[default]}" <<'PY' | tee "$work/summary"
import statistics, sys
floor, noop, default = ([float(x) for x in arg.split()] for arg in sys.argv[1:4])
cpus = [[sum(map(float, run.split("/"))) for run in arg.split()] for arg in sys.argv[4:7]]
f = statistics.median(floor)
fc = statistics.median(cpus[0])
print(f"{'variant':<10}{'median req/s':>14}{'min–max':>22}{'share of the floor':>26}{'CPU µs/request':>16}{'floor/CPU':>11}")
for (name, runs, goal), cpu in zip(
    (("floor", floor, None), ("noop", noop, 0.6), ("default", default, 0.35)), cpus
):
    m = statistics.median(runs)
    c = statistics.median(cpu)
    share = f"{m / f:.2f}" + (f" (goal ≥ {goal})" if goal else "")
    print(f"{name:<10}{m:>14.0f}{f'{min(runs):.0f}–{max(runs):.0f}':>22}{share:>26}{c:>16.1f}{fc / c:>11.2f}")
print(f"half={int(statistics.median(default) / 2)}")
PY

half="$(sed -n 's/^half=//p' "$work/summary")"
port="$(free_port)"
start default "$port"
echo "default config at half its ceiling ($half/s, $HALF_STEP, open loop):"
taskset -c "$LOAD_CPUS" "$binary" loadtest --target "http://127.0.0.1:$port" --rates "$half" \
  --step "$HALF_STEP" --connections "$CONNECTIONS" --topic bench.events --pid "$server"
echo "(goal: p99 ≤ 5 ms)"
