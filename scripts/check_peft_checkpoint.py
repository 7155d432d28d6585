#!/usr/bin/env python3
"""Loads a hicra checkpoint with PEFT (transformers + peft on the same libtorch) and prints the
logprobs of a fixed completion with and without the adapter, for comparison with hicra's own
(`tests/offline_training.rs` prints them with --nocapture). Model: the tiny llama fixture.

    .deps/venv/bin/python scripts/check_peft_checkpoint.py /tmp/hicra-offline-straight-*/checkpoint
"""
import sys, pathlib, json
sys.path.insert(0, "scripts/fixtures")
import make_parity_fixtures  # noqa
import torch
torch.set_num_threads(2)
from transformers import AutoModelForCausalLM
from peft import PeftModel
ckpt = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained("core/tests/fixtures/parity/llama", dtype=torch.float32, attn_implementation="eager")
base_model = model
model = PeftModel.from_pretrained(model, ckpt)
model.eval()
prompt, completion = [5, 17, 99, 3], [7, 8, 9, 10, 11]
ids = torch.tensor([prompt + completion])
with torch.no_grad():
    lp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt)-1:-1].float(), -1)
    got = lp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
    with model.disable_adapter():
        lp0 = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt)-1:-1].float(), -1)
        base = lp0.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
print(json.dumps({"peft_with_adapter": got.tolist(), "peft_base": base.tolist()}))
