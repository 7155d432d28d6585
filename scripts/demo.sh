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
rm -f target/demo-rollouts.jsonl
"$hicra" serve --port "$port" --max-batch 32 --max-context 512 \
  --train-config examples/online_arithmetic/trainer.toml --groups-per-step 4 \
  --rollout-log target/demo-rollouts.jsonl 2> target/demo-serve.log &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 1 120); do
  .deps/venv/bin/python -c "import httpx,sys; httpx.get('http://127.0.0.1:$port/health').raise_for_status()" 2>/dev/null && break
  sleep 1
done
.deps/venv/bin/python examples/online_arithmetic/client.py --url "http://127.0.0.1:$port" --rounds "${HICRA_DEMO_ROUNDS:-4}"
kill $server 2>/dev/null || true
# The paper's analyses of the session (entropy, perplexity, semantic entropy, accuracy per step).
echo
echo "[demo] hicra analyze target/demo-rollouts.jsonl -> target/demo-analysis/"
"$hicra" analyze target/demo-rollouts.jsonl --out target/demo-analysis

if [ -t 0 ]; then
  echo
  echo "Your turn (empty line to quit):"
  while IFS= read -r -p "> " line && [ -n "$line" ]; do
    "$hicra" generate --chat --prompt "$line" --max-tokens 256 --temperature 0.7 --top-p 0.9 --seed "$RANDOM"
  done
fi
