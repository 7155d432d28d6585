#!/usr/bin/env python3
"""The training step `hicra bench-train` times, done with transformers + PEFT on the same
libtorch (the PyPI torch 2.11 wheel): same model (the GGUF dequantized to f32, or a random-weight
model of a published shape with --shape), same LoRA (rank r, alpha 2r, q/k/v/o/gate/up/down),
same synthetic batch (B sequences of P prompt + C completion tokens, ids from the same formula),
same micro-batches, same loss (token-level clipped surrogate against fixed sampling logprobs),
AdamW, gradient clipping at 1.0. Logits are computed for the completion only
(`logits_to_keep`, as TRL's GRPO trainer does). Prints one JSON line like hicra's.

    .deps/venv/bin/python scripts/bench_train_reference.py --model-gguf .deps/models/smollm2-135m-instruct.gguf
    .deps/venv/bin/python scripts/bench_train_reference.py --shape qwen2.5-0.5b --batch 8 --prompt-tokens 512 --completion-tokens 512
"""
import argparse
import json
import pathlib
import resource
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "fixtures"))
sys.path.insert(0, str(ROOT / "scripts"))
try:
    import make_parity_fixtures  # noqa: F401,E402  (side effect: torch importable without CUDA libraries)
except ImportError:
    pass  # a GPU machine without the fixtures' own dependencies (gguf): torch imports as it is
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from shapes import SHAPES, random_model, synthetic_id  # noqa: E402

def load_model(args, dtype):
    if args.shape:
        return random_model(args.shape, dtype, args.device, args.seed)
    gguf = pathlib.Path(args.model_gguf).resolve()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    return model.to(args.device)


def peak_memory_mib(device: str) -> float:
    """Peak device memory on CUDA; peak resident memory of the process on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-gguf", default=str(ROOT / ".deps" / "models" / "smollm2-135m-instruct.gguf"))
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of a published shape instead of the GGUF")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--completion-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward pass")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    import os
    torch.set_num_threads(args.threads or (os.cpu_count() or 1))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = load_model(args, dtype)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    vocab = model.config.vocab_size
    ident = lambda i: synthetic_id(i, vocab)  # noqa: E731  (same ids as hicra bench-train)
    prompt = [ident(i) for i in range(args.prompt_tokens)]
    rows = [prompt + [ident(10_000 + b * 1000 + t) for t in range(args.completion_tokens)] for b in range(args.batch)]
    ids = torch.tensor(rows, device=args.device)
    rewards = torch.tensor([float(b % 2) for b in range(args.batch)], device=args.device)
    adv = ((rewards - rewards.mean()) / (rewards.std() + 1e-6)).unsqueeze(1).expand(-1, args.completion_tokens)
    old = torch.full((args.batch, args.completion_tokens), -2.0, device=args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    total_tokens = adv.numel()

    def step():
        opt.zero_grad()
        for start in range(0, args.batch, args.micro_batch):
            rows_ = slice(start, start + args.micro_batch)
            # logits_to_keep: only the positions that predict completion tokens (TRL's GRPO).
            logits = model(input_ids=ids[rows_], logits_to_keep=args.completion_tokens + 1).logits[:, :-1].float()
            new = torch.log_softmax(logits, -1).gather(-1, ids[rows_, args.prompt_tokens:].unsqueeze(-1)).squeeze(-1)
            ratio = (new - old[rows_]).exp()
            loss = -torch.minimum(ratio * adv[rows_], ratio.clamp(0.8, 1.28) * adv[rows_]).sum() / total_tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    if not args.no_warmup:
        step()
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    step_s = (time.perf_counter() - started) / args.steps
    tokens = args.batch * args.completion_tokens
    print(json.dumps({
        "engine": "transformers+peft", "batch": args.batch, "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens, "rank": args.rank, "step_seconds": step_s,
        "trained_tokens_per_s": tokens / step_s,
        "sequence_tokens_per_s": args.batch * (args.prompt_tokens + args.completion_tokens) / step_s,
        "adapter_values": sum(p.numel() for p in params), "threads": torch.get_num_threads(),
        "micro_batch": args.micro_batch, "gradient_checkpointing": args.gradient_checkpointing,
        "shape": args.shape, "device": args.device, "dtype": args.dtype, "peak_memory_mib": peak_memory_mib(args.device),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
