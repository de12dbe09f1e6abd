#!/usr/bin/env bash
# Instructions the node executes per decided signal, counted by callgrind:
# a measure that, unlike timings, does not move with the machine's speed
# (BENCHMARKS.md, "Session 12"). The node runs under valgrind on a fresh
# data dir; `tai bench --target` warms it up, the counts are zeroed, a
# second bench runs at a fixed rate, the counts are dumped.
#
#   scripts/instructions.sh [--bin target/release/tai] [--backend embedded|amqp]
#                           [--rate 300] [--duration 10]
#
# Prints one JSON object: instructions, decided, instructions_per_signal,
# and allocations_per_signal (calls into mimalloc's allocation and
# reallocation entry points, which Rust's global allocator goes through:
# within a few per cent from run to run, as the instructions are: how
# the signals fall into batches differs a little each time).
# The counts include the node answering the bench (its receipts, read
# after the run to time the decisions). Caveats: at such rates every batch
# holds one signal, so per-batch costs weigh more than at load; valgrind
# hides the CPU's SHA extensions, so receipt hashing counts far more than
# it costs on the real CPU. With --backend amqp the broker must run on
# 127.0.0.1:5672; the run's queues are deleted afterwards (rabbitmqctl).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=target/release/tai backend=embedded rate=300 duration=10
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --backend) backend=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    *) echo "instructions.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$backend" in embedded|amqp) ;; *) echo "instructions.sh: --backend is embedded or amqp" >&2; exit 2 ;; esac
command -v valgrind > /dev/null || { echo "instructions.sh: valgrind is not installed" >&2; exit 1; }
[ -x "$bin" ] || { echo "instructions.sh: no executable at $bin (cargo build --release -p tai-node)" >&2; exit 1; }

dir=$(mktemp -d /tmp/tai-instructions.XXXXXX)
queue="tai-instructions.$$.signals"
vpid=
cleanup() {
  if [ -n "$vpid" ] && kill -0 "$vpid" 2> /dev/null; then
    kill -INT "$vpid" 2> /dev/null || true
    wait "$vpid" 2> /dev/null || true
  fi
  rm -rf "$dir"
  if [ "$backend" = amqp ] && command -v rabbitmqctl > /dev/null; then
    rabbitmqctl -q delete_queue "$queue" > /dev/null 2>&1 || true
    rabbitmqctl -q delete_queue "$queue.deadletter" > /dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# Two free loopback ports for ingress and operator.
read -r ingress operator < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')

{
  cat << EOF
[node]
mode = "dev"
data_dir = "$dir/data"
[ingress]
listen = "127.0.0.1:$ingress"
[ingress.rate_limits]
global_per_sec = 10000000
enterprise_per_sec = 10000000
[operator]
listen = "127.0.0.1:$operator"
admin_token = "instructions-admin-token"
[kanban]
wip_limit = 512
prefetch = 50
max_depth = 100000000
backend = "$backend"
amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"
amqp_queue = "$queue"
[skus.bench]
policies = []
quota = 1000000000000
EOF
  for i in $(seq 0 99); do
    printf '[[tenants]]\nid = "bench-%d"\nsecrets = ["bench-secret-%d"]\ntier = "enterprise"\n' "$i" "$i"
  done
} > "$dir/node.toml"

RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
  "$bin" serve --config "$dir/node.toml" > "$dir/serve.log" 2>&1 &
vpid=$!
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$operator/ready" > /dev/null && break
  kill -0 "$vpid" 2> /dev/null || { cat "$dir/serve.log" >&2; exit 1; }
  sleep 0.5
done
curl -sf "http://127.0.0.1:$operator/ready" > /dev/null \
  || { echo "instructions.sh: the node did not become ready" >&2; tail -20 "$dir/serve.log" >&2; exit 1; }

# A bench that fails says why (its log), instead of leaving an empty report.
bench() {
  if ! "$bin" bench --target --config "$dir/node.toml" --rate "$rate" --duration "$1" \
    --no-baseline --json > "$dir/bench.out" 2> "$dir/bench.log"; then
    echo "instructions.sh: tai bench failed:" >&2
    tail -20 "$dir/bench.log" >&2
    exit 1
  fi
}
bench 3
callgrind_control -z "$vpid" > /dev/null 2>&1
bench "$duration"
tail -1 "$dir/bench.out" > "$dir/bench.json"
callgrind_control -d "$vpid" > /dev/null 2>&1

python3 - "$dir/bench.json" "$dir"/callgrind.out.* << 'EOF'
import json, sys
import re
bench = json.load(open(sys.argv[1]))
total = None
# Calls into these, from the `calls=` lines under each `cfn=` (a
# function is named once, then referred to by its number).
allocators = {"mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned"}
allocations = 0
for path in sys.argv[2:]:
    names, callee = {}, None
    for line in open(path, errors="replace"):
        if line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
        elif line.startswith(("fn=", "cfn=")):
            m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
            if m and m.group(2):
                names[m.group(1)] = m.group(2)
            if line.startswith("cfn="):
                callee = names.get(m.group(1)) if m else None
        elif line.startswith("calls=") and callee in allocators:
            allocations += int(line[6:].split()[0])
decided = bench["decided"]
print(json.dumps({
    "instructions": total,
    "decided": decided,
    "decided_per_sec": round(bench["decided_per_sec"], 1),
    "instructions_per_signal": round(total / decided) if total and decided else None,
    "allocations_per_signal": round(allocations / decided, 1) if decided else None,
}))
EOF
