#!/usr/bin/env bash
# The main job, for now: set up, build, and chat with the default model
# (SmolLM2-135M-Instruct) on CPU or CUDA.
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
if [ -t 0 ]; then
  echo
  echo "Your turn (empty line to quit):"
  while IFS= read -r -p "> " line && [ -n "$line" ]; do
    "$hicra" generate --chat --prompt "$line" --max-tokens 256 --temperature 0.7 --top-p 0.9 --seed "$RANDOM"
  done
fi
