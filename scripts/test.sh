#!/usr/bin/env bash
# Runs every test on a fresh machine: set up dependencies, build once in release mode (the
# tests drive real models, which debug builds of libtorch glue make needlessly slow), test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
echo "[test] cargo build --release"
cargo build --release --workspace
echo "[test] cargo test --release"
cargo test --release --workspace
echo "[test] pytest tests/python (the real server through the official openai client)"
.deps/venv/bin/python -m pytest tests/python -q
