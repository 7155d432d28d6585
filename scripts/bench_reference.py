#!/usr/bin/env python3
"""Reference engines for hicra's side-by-side benchmark (see scripts/bench.sh).

Measures, for the same GGUF model and the same workload as `hicra bench`:
  * Hugging Face transformers `generate` on the PyPI torch 2.11 wheel (the libtorch hicra links),
    model loaded from the GGUF and dequantized to --dtype;
  * llama.cpp through llama-cpp-python (CPU build), on an F32 copy of the GGUF (same arithmetic
    as hicra's f32 path) and on the original quantized file (what llama.cpp users run).

Workload (identical to `hicra bench`): B identical prompts of exactly --prompt-tokens token ids
(a fixed English text, tokenized by the engine's own tokenizer from the GGUF, repeated and
truncated; no BOS added), greedy decoding, end-of-sequence disabled so every sequence produces
exactly --decode-tokens new tokens.

  prefill: one batched forward over B x prompt_tokens tokens plus picking the first new token
           (greedy). prefill_tokens_per_s = B * prompt_tokens / t_prefill.
  decode:  the remaining decode_tokens - 1 steps, each one forward over B single tokens plus
           greedy choice of the next token. decode_steps = decode_tokens - 1,
           decode_tokens_per_s = B * decode_steps / t_decode,
           decode_ms_per_step = 1000 * t_decode / decode_steps.

  transformers: t_prefill = wall time of generate(max_new_tokens=1) (tokenization excluded; the
           inputs are tensors already). t_decode = time(generate(max_new_tokens=N, min_new_tokens=N))
           - t_prefill, both measured back to back after one warm-up generate per batch size; the
           generate overhead outside the forwards is therefore counted in t_decode the way a
           user of generate pays it. With --repeats R > 1 the fastest of R measurements is used.
  llama.cpp: low-level API (llama_batch with one sequence id per prompt, non-unified KV cache,
           n_ctx = B * (prompt + decode + 16) cells (at least 512), n_batch = max(512, B * prompt_tokens) so the
           whole prefill is one llama_decode call (llama.cpp splits it into n_ubatch=512 micro
           batches itself), default n_ubatch and flash-attention setting). t_prefill = the
           llama_decode of the B*P prompt tokens (logits only for each sequence's last token)
           + argmax; t_decode = decode_steps x (llama_decode of B tokens + B argmaxes over the
           vocabulary in numpy). The KV cache is cleared between runs; one warm-up run per batch.

Threads: --threads (default: physical cores, which is libtorch's default intra-op thread count,
i.e. what hicra runs with) for torch.set_num_threads and for llama.cpp's n_threads and
n_threads_batch. Recorded in every JSON line.

Output: one JSON line per (engine, batch) on stdout, same fields as `hicra bench --json` plus
"engine", "dtype", "device", "threads", "decode_steps", "loadavg_1m", engine details, and
"greedy_head": the first 8 generated token ids of sequence 0 (a sanity check that the engines
compute the same continuation; f32 engines should agree, the quantized file may differ). Progress goes to stderr.
Each engine runs in its own subprocess (libtorch's and llama.cpp's OpenMP runtimes stay apart).

Usage (from the repository root):
  .deps/venv/bin/python scripts/bench_reference.py --model-gguf .deps/models/smollm2-135m-instruct.gguf \
      --batch 1,8,32 --prompt-tokens 128 --decode-tokens 64 --device cpu --dtype f32 [--only transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROMPT_TEXT = (
    "The history of computing is a story of people who wanted to calculate faster and more "
    "reliably than they could by hand. Early mechanical calculators gave way to electronic "
    "machines, then to transistors, integrated circuits and the microprocessor. Each step made "
    "computers smaller, cheaper and more capable, and each step changed what people expected "
    "a computer to do. "
)


def log(msg: str) -> None:
    print(f"[bench-ref] {msg}", file=sys.stderr, flush=True)


def physical_cores() -> int:
    """Physical cores (libtorch's default intra-op thread count), from /proc/cpuinfo."""
    try:
        cores = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
        if core is not None:
            cores.add((phys, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return sum(v), v[3]


def wait_idle(max_s: float) -> None:
    """Wait (at most max_s) until the other processes leave our `threads` cores free.

    A 2-core machine shared with a compiler gives meaningless numbers: OpenMP workers (libtorch
    and llama.cpp both) spin at barriers while a sibling thread is descheduled. Measured runs start
    only when the CPUs were >= 90% idle over the last 0.5 s (or after max_s anyway)."""
    if max_s <= 0:
        return
    end = time.monotonic() + max_s
    while True:
        t1, i1 = _cpu_times()
        time.sleep(0.5)
        t2, i2 = _cpu_times()
        if t2 == t1 or (i2 - i1) / (t2 - t1) >= 0.9 or time.monotonic() > end:
            return


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def rates(batch: int, prompt: int, steps: int, t_prefill: float, t_decode: float) -> dict:
    return {
        "prefill_tokens_per_s": round(batch * prompt / t_prefill, 3),
        "decode_tokens_per_s": round(batch * steps / t_decode, 3) if steps > 0 else None,
        "decode_ms_per_step": round(1000.0 * t_decode / steps, 3) if steps > 0 else None,
        "prefill_s": round(t_prefill, 4),
        "decode_s": round(t_decode, 4),
        "loadavg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews numbers
    }


def prompt_ids(encode, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += encode(PROMPT_TEXT)
    return ids[:n]


# --------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------


def run_transformers(a: argparse.Namespace, batches: list[int]) -> None:
    # The PyPI torch wheel links the CUDA libraries even for CPU work; reuse the fixture script's
    # stub-library mechanism (it builds/caches .deps/torch-cuda-stubs and preloads them).
    # Importing that module runs ensure_torch_importable() and imports torch/transformers.
    if not a.verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantizer uses tqdm directly
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
    sys.path.insert(0, str(ROOT / "scripts" / "fixtures"))
    # (A no-op when the NVIDIA wheels are all installed. --device cuda needs the real ones: the
    # stubs abort when called.)
    try:
        import make_parity_fixtures  # noqa: F401,E402  (side effect: torch importable)
    except ImportError:
        pass  # a GPU machine without the fixtures' own dependencies (gguf)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not a.verbose:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(a.threads)  # the fixture module sets 1; use the same count as hicra
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    dev = torch.device(a.device)
    t0 = time.perf_counter()
    if a.shape:
        # Random weights of a published shape, the prompt ids hicra bench uses for it.
        sys.path.insert(0, str(ROOT / "scripts"))
        import shapes
        model = shapes.random_model(a.shape, dtype, a.device, seed=0).eval()
        ids = shapes.prompt_ids(model.config.vocab_size, a.prompt_tokens)
        pad = 0
    else:
        gguf = Path(a.model_gguf)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
        model = model.to(dev).eval()
        ids = prompt_ids(lambda s: tok(s, add_special_tokens=False)["input_ids"], a.prompt_tokens)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    log(f"transformers {transformers.__version__}, torch {torch.__version__}: loaded in "
        f"{time.perf_counter() - t0:.1f}s, threads={torch.get_num_threads()}, "
        f"attn={model.config._attn_implementation}")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    head: list[int] = []

    def gen(inp: torch.Tensor, mask: torch.Tensor, n: int) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=inp, attention_mask=mask, do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=pad,
                                 num_beams=1, use_cache=True)
        sync()
        dt = time.perf_counter() - t
        assert out.shape == (inp.shape[0], inp.shape[1] + n), out.shape
        head[:] = out[0, inp.shape[1]:inp.shape[1] + 8].tolist()
        return dt

    steps = a.decode_tokens - 1
    for b in batches:
        inp = torch.tensor([ids] * b, dtype=torch.long, device=dev)
        mask = torch.ones_like(inp)
        gen(inp, mask, min(a.decode_tokens, 8))  # warm-up
        t1s, tns = [], []
        for _ in range(a.repeats):
            wait_idle(a.wait_idle)
            t1s.append(gen(inp, mask, 1))
            wait_idle(a.wait_idle)
            tns.append(gen(inp, mask, a.decode_tokens))
        t1, tn = min(t1s), min(tns)
        row = {"engine": "transformers", "batch": b, "prompt_tokens": a.prompt_tokens,
               "decode_tokens": a.decode_tokens, "decode_steps": steps,
               **rates(b, a.prompt_tokens, steps, t1, tn - t1),
               "dtype": a.dtype, "device": a.device, "threads": torch.get_num_threads(),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
               "attn_implementation": model.config._attn_implementation,
               "greedy_head": head}
        emit(row)
        log(f"transformers B={b}: prefill {row['prefill_tokens_per_s']:.1f} tok/s, "
            f"decode {row['decode_tokens_per_s']:.1f} tok/s")


# --------------------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------------------


def f32_copy(src: Path, threads: int) -> Path:
    """Dequantize `src` to an all-F32 GGUF next to it (cached) with llama_model_quantize."""
    import llama_cpp as L

    dst = src.parent / (src.name[: -len(".gguf")] + "-f32.gguf")
    stamp = dst.with_suffix(".gguf.src")
    key = f"{os.path.realpath(src)} {os.path.getsize(src)} {os.path.getmtime(os.path.realpath(src))}"
    if dst.exists() and stamp.exists() and stamp.read_text() == key:
        return dst
    log(f"converting {src.name} -> {dst.name} (F32) with llama_model_quantize")
    p = L.llama_model_quantize_default_params()
    p.ftype = L.LLAMA_FTYPE_ALL_F32
    p.allow_requantize = True
    p.quantize_output_tensor = True
    p.pure = True  # every tensor F32, no per-tensor type heuristics
    p.nthread = threads
    tmp = dst.with_suffix(".tmp")
    rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), p)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize to F32 failed (rc={rc})")
    os.replace(tmp, dst)
    stamp.write_text(key)
    return dst


def gguf_file_type(path: Path) -> str:
    try:
        from gguf import GGUFReader, LlamaFileType

        r = GGUFReader(str(path))
        f = r.fields.get("general.file_type")
        if f is not None:
            return LlamaFileType(int(f.parts[f.data[0]][0])).name.removeprefix("MOSTLY_")
    except Exception:  # noqa: BLE001  (only a label)
        pass
    return "unknown"


def llama_batched_context(L, model, ids: list[int], b: int, decode_tokens: int, threads: int):
    """A llama.cpp context for `b` sequences of prompt `ids` plus `decode_tokens` each (one
    sequence id per prompt, non-unified KV cache), the prompt batch (logits only at each
    prompt's last position) and a one-token-per-sequence decode batch; also the context's
    parameters, for the record."""
    P = len(ids)
    cp = L.llama_context_default_params()
    # Every sequence needs P + decode cells, and llama.cpp caps n_batch at n_ctx, so a
    # smaller context would abort long prompts (GGML_ASSERT n_tokens_all <= n_batch).
    cp.n_ctx = max(512, b * (P + decode_tokens + 16))
    cp.n_batch = max(512, b * P)
    cp.n_seq_max = b
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.kv_unified = False
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit(f"llama.cpp could not create a context for batch {b}")
    pbatch = L.llama_batch_init(b * P, 0, 1)
    dbatch = L.llama_batch_init(b, 0, 1)
    for s in range(b):
        for i, t in enumerate(ids):
            k = s * P + i
            pbatch.token[k] = t
            pbatch.pos[k] = i
            pbatch.n_seq_id[k] = 1
            pbatch.seq_id[k][0] = s
            pbatch.logits[k] = 1 if i == P - 1 else 0
        dbatch.n_seq_id[s] = 1
        dbatch.seq_id[s][0] = s
        dbatch.logits[s] = 1
    pbatch.n_tokens = b * P
    dbatch.n_tokens = b
    return ctx, cp, pbatch, dbatch


def run_llamacpp(a: argparse.Namespace, batches: list[int]) -> None:
    import ctypes

    import llama_cpp as L
    import numpy as np

    if a.device != "cpu" and not L.llama_supports_gpu_offload():
        log("llama-cpp-python here is a CPU-only build: skipping llama.cpp for --device "
            f"{a.device} (rebuild it with CMAKE_ARGS=-DGGML_CUDA=on for GPU rows)")
        return

    @L.llama_log_callback
    def _quiet(level, text, user):  # noqa: ARG001
        if a.verbose:
            sys.stderr.write(text.decode(errors="replace"))

    L.llama_log_set(_quiet, ctypes.c_void_p())
    L.llama_backend_init()

    src = Path(a.model_gguf)
    models = []
    if a.dtype == "f32":
        models.append(("llama.cpp-f32", f32_copy(src, a.threads)))
    elif a.dtype in ("f16", "bf16"):
        log(f"llama.cpp: no {a.dtype} copy is made; only the original file is measured")
    qname = gguf_file_type(src).lower()
    models.append((f"llama.cpp-{qname}", src))

    steps = a.decode_tokens - 1
    ver = getattr(L, "__version__", "?")
    for engine, path in models:
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0 if a.device == "cpu" else 999
        model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            raise SystemExit(f"llama.cpp could not load {path}")
        vocab = L.llama_model_get_vocab(model)
        n_vocab = L.llama_vocab_n_tokens(vocab)

        def encode(s: str) -> list[int]:
            bs = s.encode()
            buf = (L.llama_token * (len(bs) + 8))()
            n = L.llama_tokenize(vocab, bs, len(bs), buf, len(buf), False, False)
            assert n >= 0
            return list(buf[:n])

        ids = prompt_ids(encode, a.prompt_tokens)
        log(f"{engine} (llama-cpp-python {ver}, {path.name}, file type {gguf_file_type(path)}): "
            f"vocab={n_vocab}, threads={a.threads}")
        for b in batches:
            P = a.prompt_tokens
            ctx, cp, pbatch, dbatch = llama_batched_context(L, model, ids, b, a.decode_tokens, a.threads)
            mem = L.llama_get_memory(ctx)

            def argmax_rows(idx: list[int]) -> list[int]:
                out = []
                for i in idx:
                    ptr = L.llama_get_logits_ith(ctx, i)
                    out.append(int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax()))
                return out

            def once(n_steps: int) -> tuple[float, float, list[int]]:
                L.llama_memory_clear(mem, True)
                t = time.perf_counter()
                rc = L.llama_decode(ctx, pbatch)
                assert rc == 0, f"llama_decode(prefill) = {rc}"
                nxt = argmax_rows([s * P + P - 1 for s in range(b)])
                t_pre = time.perf_counter() - t
                toks = [nxt[0]]
                t = time.perf_counter()
                for step in range(n_steps):
                    for s in range(b):
                        dbatch.token[s] = nxt[s]
                        dbatch.pos[s] = P + step
                    rc = L.llama_decode(ctx, dbatch)
                    assert rc == 0, f"llama_decode(step {step}) = {rc}"
                    nxt = argmax_rows(list(range(b)))
                    toks.append(nxt[0])
                t_dec = time.perf_counter() - t
                return t_pre, t_dec, toks

            once(min(steps, 8))  # warm-up
            pres, decs = [], []
            for _ in range(a.repeats):
                wait_idle(a.wait_idle)
                tp, td, toks = once(steps)
                pres.append(tp)
                decs.append(td)
            tp, td = min(pres), min(decs)
            row = {"engine": engine, "batch": b, "prompt_tokens": P,
                   "decode_tokens": a.decode_tokens, "decode_steps": steps,
                   **rates(b, P, steps, tp, td),
                   "dtype": a.dtype if engine.endswith("f32") else qname, "device": a.device,
                   "threads": a.threads, "versions": {"llama-cpp-python": ver},
                   "model_file": path.name, "n_ubatch": cp.n_ubatch,
                   "flash_attn_type": cp.flash_attn_type, "greedy_head": toks[:8]}
            emit(row)
            log(f"{engine} B={b}: prefill {row['prefill_tokens_per_s']:.1f} tok/s, "
                f"decode {row['decode_tokens_per_s']:.1f} tok/s")
            L.llama_batch_free(pbatch)
            L.llama_batch_free(dbatch)
            L.llama_free(ctx)
        L.llama_model_free(model)


# --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-gguf", default=str(ROOT / ".deps" / "models" / "smollm2-135m-instruct.gguf"))
    ap.add_argument("--shape", help="transformers only: random weights of a published shape (scripts/shapes.py), like hicra bench --shape")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--only", choices=["transformers", "llamacpp"])
    ap.add_argument("--threads", type=int, default=physical_cores(),
                    help="intra-op threads (default: physical cores = libtorch's default)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measured runs per batch; the fastest prefill and decode times are kept")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="before each measured run wait up to this many seconds for idle CPUs (0: never)")
    ap.add_argument("--transformers-batch", default=None,
                    help="batch sizes for transformers if different from --batch (to cap runtime)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    if a.decode_tokens < 2:
        ap.error("--decode-tokens must be >= 2 (decode excludes the first token)")
    if a.shape and a.only != "transformers":
        ap.error("--shape needs --only transformers (llama.cpp runs GGUF files)")
    if not a.shape and not Path(a.model_gguf).exists():
        ap.error(f"no such model: {a.model_gguf}")

    if a.only is None:
        # One subprocess per engine: libtorch and llama.cpp bring different OpenMP runtimes.
        rc = 0
        for eng in ("transformers", "llamacpp"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--only", eng]
            rc |= subprocess.run(cmd).returncode
        sys.exit(rc)

    batches = [int(x) for x in a.batch.split(",") if x]
    if a.only == "transformers":
        tb = [int(x) for x in a.transformers_batch.split(",") if x] if a.transformers_batch else batches
        run_transformers(a, tb)
    else:
        run_llamacpp(a, batches)


if __name__ == "__main__":
    main()
