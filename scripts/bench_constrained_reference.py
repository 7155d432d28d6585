#!/usr/bin/env python3
"""llama.cpp's constrained decoding cost, measured like `hicra bench --constrained`.

Same model (the F32 copy of the default GGUF, same arithmetic as hicra's f32 path), same
prompt text, same greedy decode of `--decode-tokens` tokens per sequence, batch sizes given;
each sequence decodes once freely and once under a GBNF grammar of JSON records, one per line,
without end (llama-cpp-python's JSON-schema converter on the record schema hicra's bench
uses, wrapped as `root ::= (record "\\n")+`). Both runs choose tokens with a llama.cpp sampler
chain per sequence, `[logit bias: end-of-generation tokens -inf, (grammar,) greedy]`, as
llama.cpp's server does: the end-of-generation ban keeps every sequence decoding the full
length in both runs, so the difference is the grammar's cost.

Output: one JSON line per batch size: decode ms per step free and constrained, and the added
ms per generated token. Run by scripts/bench_constrained.sh.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_reference import llama_batched_context  # noqa: E402
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog while the river keeps running to the sea. "
RECORD_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def log(msg: str) -> None:
    print(f"[bench-constrained-ref] {msg}", file=sys.stderr, flush=True)


def records_grammar() -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    record = json_schema_to_gbnf(json.dumps(RECORD_SCHEMA))
    return record.replace("root ::=", "record ::=", 1) + '\nroot ::= (record "\\n")+\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-gguf", type=Path, default=ROOT / ".deps/models/smollm2-135m-instruct-f32.gguf")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()

    import llama_cpp as L

    @L.llama_log_callback
    def _quiet(level, text, user):  # noqa: ARG001
        pass

    L.llama_log_set(_quiet, ctypes.c_void_p())
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(a.model_gguf).encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {a.model_gguf}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    text = (PROMPT_TEXT * (1 + a.prompt_tokens // 8)).encode()
    buf = (L.llama_token * (len(text) + 8))()
    n = L.llama_tokenize(vocab, text, len(text), buf, len(buf), False, False)
    ids = list(buf[: min(n, a.prompt_tokens)])
    end_of_generation = [t for t in range(n_vocab) if L.llama_vocab_is_eog(vocab, t)]
    grammar = records_grammar().encode()

    def chain(constrained: bool):
        params = L.llama_sampler_chain_default_params()
        params.no_perf = True
        smpl = L.llama_sampler_chain_init(params)
        bias = (L.llama_logit_bias * len(end_of_generation))()
        for i, t in enumerate(end_of_generation):
            bias[i].token = t
            bias[i].bias = float("-inf")
        L.llama_sampler_chain_add(smpl, L.llama_sampler_init_logit_bias(n_vocab, len(end_of_generation), bias))
        if constrained:
            g = L.llama_sampler_init_grammar(vocab, grammar, b"root")
            if not g:
                raise SystemExit("llama.cpp rejected the grammar")
            L.llama_sampler_chain_add(smpl, g)
        L.llama_sampler_chain_add(smpl, L.llama_sampler_init_greedy())
        return smpl

    P = len(ids)
    for b in [int(x) for x in a.batch.split(",")]:
        ctx, _, pbatch, dbatch = llama_batched_context(L, model, ids, b, a.decode_tokens, a.threads)
        mem = L.llama_get_memory(ctx)

        def decode_ms_per_step(constrained: bool) -> tuple[float, str]:
            samplers = [chain(constrained) for _ in range(b)]
            L.llama_memory_clear(mem, True)
            assert L.llama_decode(ctx, pbatch) == 0
            nxt = [L.llama_sampler_sample(samplers[s], ctx, s * P + P - 1) for s in range(b)]
            first = [nxt[0]]
            steps = a.decode_tokens - 1
            started = time.perf_counter()
            for step in range(steps):
                for s in range(b):
                    dbatch.token[s], dbatch.pos[s] = nxt[s], P + step
                assert L.llama_decode(ctx, dbatch) == 0
                nxt = [L.llama_sampler_sample(samplers[s], ctx, s) for s in range(b)]
                first.append(nxt[0])
            elapsed = time.perf_counter() - started
            for smpl in samplers:
                L.llama_sampler_free(smpl)
            return 1e3 * elapsed / steps, detokenize(first[:24])

        def detokenize(tokens: list[int]) -> str:
            pieces = []
            for t in tokens:
                out = (ctypes.c_char * 64)()
                n = L.llama_token_to_piece(vocab, t, out, 64, 0, True)
                pieces.append(out.raw[:n])
            return b"".join(pieces).decode(errors="replace")

        decode_ms_per_step(True)  # warm-up (and grammar parse)
        free = min(decode_ms_per_step(False)[0] for _ in range(a.repeats))
        runs = [decode_ms_per_step(True) for _ in range(a.repeats)]
        constrained = min(ms for ms, _ in runs)
        log(f"batch {b}: free {free:.2f} ms/step, constrained {constrained:.2f} ms/step; sequence 0 began {runs[0][1]!r}")
        print(json.dumps({
            "engine": "llama.cpp-f32", "batch": b, "prompt_tokens": P, "decode_tokens": a.decode_tokens,
            "decode_ms_per_step": free, "constrained_decode_ms_per_step": constrained,
            "constrained_extra_ms_per_token": (constrained - free) / b, "threads": a.threads,
            "versions": {"llama-cpp-python": getattr(L, "__version__", "?")},
        }), flush=True)
        L.llama_batch_free(pbatch)
        L.llama_batch_free(dbatch)
        L.llama_free(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
