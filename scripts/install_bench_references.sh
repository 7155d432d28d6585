#!/usr/bin/env bash
# Installs the reference engines the benchmarks compare hicra with (transformers, PEFT,
# llama-cpp-python and its server) into .deps/venv: pinned, without dependency resolution (see
# scripts/bench-requirements.txt for why), once. The marker holds the pin lists, so a changed
# pin reinstalls. Used by scripts/bench.sh and scripts/bench_server.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="$root/.deps/venv/bin/python"
marker="$root/.deps/.installed-bench"
want="$(cat scripts/fixtures/requirements-fixtures.txt scripts/bench-requirements.txt | grep -v '^\s*#' | grep -v '^\s*$')"
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
  echo "[bench] reference engines: already installed" >&2
  exit 0
fi
echo "[bench] reference engines: pip install (llama-cpp-python builds llama.cpp from source: ~10 minutes)" >&2
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
"$py" -m pip --disable-pip-version-check -q install --no-deps \
  -r scripts/fixtures/requirements-fixtures.txt -r scripts/bench-requirements.txt
printf '%s' "$want" > "$marker"
