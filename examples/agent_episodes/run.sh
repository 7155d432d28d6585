#!/usr/bin/env bash
# Runs the agent example end to end: a training server on the default model, then agent.py.
#   examples/agent_episodes/run.sh [agent.py flags]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
port="${HICRA_AGENT_PORT:-8766}"
state="$(mktemp -d)"
target/release/hicra serve --port "$port" --max-batch 16 --max-context 768 \
  --train-config examples/agent_episodes/trainer.toml --groups-per-step 4 --state-dir "$state" \
  2> target/agent-serve.log &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$state"' EXIT
for _ in $(seq 1 120); do
  .deps/venv/bin/python -c "import httpx; httpx.get('http://127.0.0.1:$port/health').raise_for_status()" 2>/dev/null && break
  sleep 1
done
.deps/venv/bin/python examples/agent_episodes/agent.py --url "http://127.0.0.1:$port" "$@"
