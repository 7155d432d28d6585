#!/usr/bin/env bash
# Server throughput side by side: `hicra serve` and llama.cpp's OpenAI-compatible server
# (llama-cpp-python's `python -m llama_cpp.server`), same model in f32, same machine, the same
# closed-loop workload from scripts/bench_server.py (streamed chat completions, C clients each
# sending requests back to back), in one run. Prints a markdown table with ratios.
#
# Usage: scripts/bench_server.sh
# Environment knobs:
#   BENCH_CONCURRENCY=1,8,32   client counts, one level each
#   BENCH_REQUESTS=4           requests per client per level
#   BENCH_MAX_TOKENS=64        completion tokens per request
#   BENCH_ENGINES="hicra llamacpp"
#   BENCH_SKIP_BUILD=1         use the existing target/release/hicra
# Output: the table on stdout; raw JSON lines in target/bench/server.jsonl.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf '[bench-server] %s\n' "$*" >&2; }

concurrency="${BENCH_CONCURRENCY:-1,8,32}"
requests="${BENCH_REQUESTS:-4}"
max_tokens="${BENCH_MAX_TOKENS:-64}"
engines=" ${BENCH_ENGINES:-hicra llamacpp} "
py="$root/.deps/venv/bin/python"
model="$root/.deps/models/smollm2-135m-instruct.gguf"
threads="$(nproc)"
# hicra decodes every client's sequence together (32 slots of prompt + completion);
# llama-cpp-python's server runs one request at a time (it queues the others: without
# --interrupt_requests False a new request cuts the streaming one off).
max_batch=32
context=512

scripts/setup.sh >&2
scripts/install_bench_references.sh
if [[ "$engines" == *" hicra "* ]] && [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  say "cargo build --release -p hicra-core"
  cargo build --release -p hicra-core >&2
fi

out="$root/target/bench"
mkdir -p "$out"
results="$out/server.jsonl"
: > "$results"
server_pid=""
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  server_pid=""
}
trap stop_server EXIT

free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_ready() {
  local url="$1" log="$2"
  for _ in $(seq 1 240); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      say "the server exited during start-up; its log:"; tail -20 "$log" >&2; return 1
    fi
    if "$py" -c 'import sys, httpx; httpx.get(sys.argv[1] + "/v1/models", timeout=2).raise_for_status()' "$url" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  say "the server did not answer /v1/models within 120 s"; return 1
}

# Runs the load generator against the server at $1 and tags its JSON lines with engine $2.
measure() {
  local url="$1" engine="$2"
  "$py" scripts/bench_server.py --url "$url" --concurrency "$concurrency" \
    --requests-per-client "$requests" --max-tokens "$max_tokens" --stream \
    | "$py" -c '
import json, sys
for line in sys.stdin:
    row = json.loads(line)
    row["engine"] = sys.argv[1]
    print(json.dumps(row), flush=True)
' "$engine" >> "$results"
}

if [[ "$engines" == *" hicra "* ]]; then
  port="$(free_port)"
  say "hicra serve (f32, max batch $max_batch) on port $port"
  target/release/hicra serve --model "$model" --port "$port" --max-batch "$max_batch" \
    --max-context "$context" > "$out/server-hicra.log" 2>&1 &
  server_pid=$!
  wait_ready "http://127.0.0.1:$port" "$out/server-hicra.log"
  measure "http://127.0.0.1:$port" hicra
  stop_server
fi

if [[ "$engines" == *" llamacpp "* ]]; then
  # The F32 copy of the GGUF that scripts/bench.sh compares against (made once).
  f32="$("$py" -c 'import sys; sys.path.insert(0, "scripts"); from pathlib import Path
from bench_reference import f32_copy; print(f32_copy(Path(sys.argv[1]), int(sys.argv[2])))' "$model" "$threads")"
  port="$(free_port)"
  say "llama_cpp.server ($(basename "$f32"), $threads threads) on port $port"
  "$py" -m llama_cpp.server --model "$f32" --host 127.0.0.1 --port "$port" \
    --n_ctx "$context" --n_threads "$threads" --n_threads_batch "$threads" --interrupt_requests False \
    > "$out/server-llamacpp.log" 2>&1 &
  server_pid=$!
  wait_ready "http://127.0.0.1:$port" "$out/server-llamacpp.log"
  measure "http://127.0.0.1:$port" llama.cpp-server
  stop_server
fi

say "raw results: $results"
"$py" - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
hicra = {r["concurrency"]: r for r in rows if r["engine"] == "hicra"}
def ratio(r, key, higher_is_better):
    h = hicra.get(r["concurrency"], {}).get(key)
    if r["engine"] == "hicra" or not h or not r.get(key):
        return ""
    return f" (x{h / r[key]:.2f})" if higher_is_better else f" (x{r[key] / h:.2f})"
print(f"{rows[0]['max_tokens'] if rows else '?'}-token streamed chat completions, closed-loop clients; "
      "x = how many times better hicra is (throughput: hicra / engine; latency: engine / hicra).\n")
print("| engine | clients | tokens/s | p50 latency | p99 latency | p50 time to first token | tokens per request | errors |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['engine']} | {r['concurrency']} | {r['tokens_per_s']:.1f}{ratio(r, 'tokens_per_s', True)} "
          f"| {r['latency_p50_s']:.2f} s{ratio(r, 'latency_p50_s', False)} | {r['latency_p99_s']:.2f} s{ratio(r, 'latency_p99_s', False)} "
          f"| {r['ttft_p50_s']:.2f} s | {r['mean_tokens_per_request']} | {r['errors']} |")
PY
