#!/usr/bin/env bash
# The main job: set up, build, chat with the default model (SmolLM2-135M-Instruct) on CPU or
# CUDA, train it online with HICRA while serving, and analyse the session.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
echo "[demo] cargo build --release"
cargo build --release -p hicra-core
hicra=target/release/hicra
for prompt in "What is the capital of France?" "Write one sentence about the sea." "What is 12 + 30?"; do
  echo
  echo ">>> $prompt"
  "$hicra" generate --chat --prompt "$prompt" --max-tokens 64
done
# Online HICRA: serve with training on, let a client ask arithmetic questions (n samples each),
# verify the answers and post rewards; the server steps between decode steps and serves the
# next request with the new adapters.
echo
echo "[demo] online HICRA session: hicra serve --train, examples/online_arithmetic/client.py"
port="${HICRA_DEMO_PORT:-8765}"
state=target/demo-state
rm -rf "$state"
serve() {
  "$hicra" serve --port "$port" --max-batch 32 --max-context 512 \
    --train-config examples/online_arithmetic/trainer.toml --groups-per-step 4 \
    --state-dir "$state" 2>> target/demo-serve.log &
  server=$!
  for _ in $(seq 1 120); do
    .deps/venv/bin/python -c "import httpx,sys; httpx.get('http://127.0.0.1:$port/health').raise_for_status()" 2>/dev/null && return
    sleep 1
  done
}
: > target/demo-serve.log
serve
trap 'kill $server 2>/dev/null || true' EXIT
.deps/venv/bin/python examples/online_arithmetic/client.py --url "http://127.0.0.1:$port" --rounds "${HICRA_DEMO_ROUNDS:-4}"
# Durability: stop the server (SIGTERM writes a last checkpoint), start it again on the same
# state folder, and check it serves the same policy version and the same greedy answers.
echo
echo "[demo] stop and restart on the same state folder ($state)"
.deps/venv/bin/python examples/online_arithmetic/restart_check.py --url "http://127.0.0.1:$port" --save target/demo-before-stop.json
kill -TERM $server; wait $server || true
grep -E "checkpoint written:" target/demo-serve.log | tail -1
serve
grep -E "^resumed from" target/demo-serve.log | tail -1
.deps/venv/bin/python examples/online_arithmetic/restart_check.py --url "http://127.0.0.1:$port" --compare target/demo-before-stop.json
kill -TERM $server; wait $server || true
# The paper's analyses of the session (entropy, perplexity, semantic entropy, accuracy per
# step), read from the state folder's journal.
echo
echo "[demo] hicra analyze $state -> target/demo-analysis/"
"$hicra" analyze "$state" --out target/demo-analysis

if [ -t 0 ]; then
  echo
  echo "Your turn (empty line to quit):"
  while IFS= read -r -p "> " line && [ -n "$line" ]; do
    "$hicra" generate --chat --prompt "$line" --max-tokens 256 --temperature 0.7 --top-p 0.9 --seed "$RANDOM"
  done
fi
