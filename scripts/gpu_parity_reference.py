#!/usr/bin/env python3
"""References for the parity tests, computed by transformers on a chosen device and dtype.

The fixtures' own references (`core/tests/fixtures/parity/<case>/reference.safetensors`) come
from transformers on the CPU in f32. `scripts/gpu-check.sh` runs this on the GPU, in f32 and in
bf16, so hicra and transformers are compared on the same card with the same dtype:

    python3 scripts/gpu_parity_reference.py --device cuda --dtype bf16 --out /tmp/parity-bf16
    HICRA_TEST_DEVICE=cuda HICRA_TEST_DTYPE=bf16 HICRA_PARITY_REFERENCE_DIR=/tmp/parity-bf16 target/release/deps/parity-*

Same inputs as the fixture's reference, same layout (`input_ids`, `lengths`, `logprobs` in f32,
`greedy_tokens`). Cases stored only as GGUF references (q8_0) are not remade here.
"""
import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "core" / "tests" / "fixtures" / "parity"
CASES = ["llama", "llama3-scaled", "llama-linear-rope", "qwen2", "qwen3"]
NEW_TOKENS = 8

# On a CPU-only machine with the CUDA-less wheel, the fixtures' helper preloads stub CUDA
# libraries so torch imports; where the real libraries exist it changes nothing. Its own
# imports (gguf) may be missing on a GPU machine, which is fine once the stubs are loaded.
sys.path.insert(0, str(ROOT / "scripts" / "fixtures"))
try:
    import make_parity_fixtures  # noqa: F401,E402
except ImportError:
    pass
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402


@torch.no_grad()
def reference(model, device: str, input_ids: torch.Tensor, lengths: list[int]) -> dict[str, torch.Tensor]:
    logprobs = torch.zeros(input_ids.shape[0], input_ids.shape[1], model.config.vocab_size, dtype=torch.float32)
    greedy = torch.zeros(input_ids.shape[0], NEW_TOKENS, dtype=torch.int64)
    config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    for row, n in enumerate(lengths):
        ids = input_ids[row : row + 1, :n].to(device)
        logprobs[row, :n] = torch.log_softmax(model(ids).logits[0].float(), dim=-1).cpu()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        greedy[row] = out[0, n:].cpu()
    return {"input_ids": input_ids.contiguous(), "lengths": torch.tensor(lengths, dtype=torch.int64), "logprobs": logprobs.contiguous(), "greedy_tokens": greedy.contiguous()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--out", type=pathlib.Path, required=True)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # f32 means f32: no TF32 matmuls (libtorch, and so hicra, leaves them off too).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for case in CASES:
        fixture = load_file(str(FIXTURES / case / "reference.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(FIXTURES / case, dtype=dtype, attn_implementation="eager").to(args.device).eval()
        result = reference(model, args.device, fixture["input_ids"], fixture["lengths"].tolist())
        (args.out / case).mkdir(parents=True, exist_ok=True)
        save_file(result, str(args.out / case / "reference.safetensors"), metadata={"generator": "scripts/gpu_parity_reference.py", "device": args.device, "dtype": args.dtype})
        print(f"{case}: reference on {args.device} in {args.dtype}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
