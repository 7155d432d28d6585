"""The published model shapes `hicra --shape NAME` builds (core/src/model/shapes.rs), for the
transformers references of the benchmarks: same configuration, random weights, same prompt ids.
Import after torch is importable (the fixtures' stub loader on CPU-only machines)."""

_QWEN = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True)

# Hugging Face config.json fields of each shape.
SHAPES = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, **_QWEN),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, **{**_QWEN, "max_position_embeddings": 40960}),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, **_QWEN),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
}


def random_model(name: str, dtype, device: str, seed: int = 0):
    """A transformers model of shape `name` with random weights, SDPA attention, on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device)


def synthetic_id(i: int, vocab_size: int) -> int:
    """The i-th id of hicra's pseudo-random token sequences (model::shapes::synthetic_token_id)."""
    return (i * 2654435761) % (vocab_size - 1) + 1


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    """The prompt ids `hicra bench` uses for a random-weight model."""
    return [synthetic_id(i, vocab_size) for i in range(n)]
