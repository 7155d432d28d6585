"""Prompt logprobs, the way evaluation harnesses ask for them (lm-evaluation-harness's
`local-completions` and `local-chat-completions`), through the official OpenAI client:
`echo` with `logprobs` on /v1/completions scores the prompt's own tokens, `max_tokens: 0` scores
without generating, token-id prompts may be batched, and the chat route answers vLLM's
`prompt_logprobs`. The numbers must be the model's teacher-forced logprobs: the ones the sampler
reported when it generated the same tokens.

A training server pauses its steps on request, so an evaluation sees one policy version.
"""

from __future__ import annotations

import time
from typing import Iterator

import httpx
import openai
import pytest

from conftest import start_training_hicra

PROMPT = "The capital of France is Paris. The capital of Italy is"
# Decode (KV cache, one position at a time) and a whole-sequence forward pass round differently
# in f32 (measured: up to 4e-6 here); a wrong position, an off-by-one context or scoring without
# the adapters is off by orders of magnitude more.
TOLERANCE = 1e-4


def ext(choice) -> dict:
    return (choice.model_extra or {}).get("hicra") or {}


def generated(client: openai.OpenAI, model_id: str, prompt, max_tokens: int = 8):
    """A greedy completion of `prompt`: (prompt ids, completion ids, their logprobs, text)."""
    r = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=max_tokens, logprobs=1, extra_body={"return_token_ids": True})
    choice = r.choices[0]
    return ext(choice)["prompt_token_ids"], ext(choice)["token_ids"], choice.logprobs.token_logprobs, choice.text


def test_echoed_prompt_logprobs_equal_the_sampled_ones(client: openai.OpenAI, model_id: str) -> None:
    prompt_ids, completion_ids, sampled, _ = generated(client, model_id, PROMPT)
    # Score the prompt and the greedy completion as one prompt: the completion's positions must
    # carry the logprobs the sampler reported for those same tokens.
    r = client.completions.create(model=model_id, prompt=prompt_ids + completion_ids, echo=True, logprobs=3, max_tokens=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt_ids) + len(completion_ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, "the first token has no context"
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    scored = lp.token_logprobs[len(prompt_ids):]
    assert scored == pytest.approx(sampled[: len(scored)], abs=TOLERANCE)
    # Greedy tokens are the most likely ones: each is the top alternative at its position.
    for token, top in zip(lp.tokens[len(prompt_ids):], lp.top_logprobs[len(prompt_ids):]):
        assert max(top, key=top.get) == token
    assert r.usage.completion_tokens == 0
    assert ext(r.choices[0]).get("rollout_id") is None, "scoring records no rollout"
    assert isinstance(ext(r.choices[0])["policy_version"], int)


def harness_loglikelihood(choice, ctxlen: int) -> tuple[float, bool]:
    """What lm-evaluation-harness's `local-completions` reads from an echoed choice: the sum of
    the continuation's logprobs (the last entry, the one generated token, left out) and whether
    every continuation token was the most likely one."""
    lp = choice.logprobs
    logprob = sum(lp.token_logprobs[ctxlen:-1])
    greedy = all(tok == max(top.values()) for tok, top in zip(lp.token_logprobs[ctxlen:-1], lp.top_logprobs[ctxlen:-1]))
    return logprob, greedy


def test_the_harness_loglikelihood_request_scores_continuations(client: openai.OpenAI, model_id: str) -> None:
    # The harness's request for loglikelihood: context + continuation ids, batched, echo,
    # logprobs 1, max_tokens 1, temperature 0. Before prompt logprobs every continuation
    # scored 0 and multiple-choice accuracy fell to chance.
    context, greedy, sampled, _ = generated(client, model_id, PROMPT, 3)
    other = [greedy[0], (greedy[1] + 1) % 1000, greedy[2]]
    r = client.completions.create(model=model_id, prompt=[context + greedy, context + other], echo=True, logprobs=1, max_tokens=1, temperature=0)
    choices = sorted(r.choices, key=lambda c: c.index)
    assert [len(c.logprobs.token_logprobs) for c in choices] == [len(context) + 3 + 1] * 2
    greedy_score, greedy_is_greedy = harness_loglikelihood(choices[0], len(context))
    other_score, other_is_greedy = harness_loglikelihood(choices[1], len(context))
    assert greedy_score == pytest.approx(sum(sampled), abs=3 * TOLERANCE)
    assert greedy_is_greedy and not other_is_greedy
    assert other_score < greedy_score < 0


def test_max_tokens_zero_returns_and_scores_the_prompt_only(client: openai.OpenAI, model_id: str, http: httpx.Client) -> None:
    r = client.completions.create(model=model_id, prompt=PROMPT, echo=True, logprobs=0, max_tokens=0)
    choice = r.choices[0]
    assert choice.text == PROMPT
    assert r.usage.prompt_tokens == len(choice.logprobs.tokens) and r.usage.completion_tokens == 0
    assert "".join(choice.logprobs.tokens) == PROMPT
    # Without echo there is nothing to return: a clear error, not an empty success.
    bad = http.post("/v1/completions", json={"model": model_id, "prompt": PROMPT, "max_tokens": 0})
    assert bad.status_code == 400 and "echo" in bad.json()["error"]["message"], bad.text
    chat = http.post("/v1/chat/completions", json={"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "max_tokens", chat.text


def test_text_offsets_point_at_each_token_of_prompt_and_completion(client: openai.OpenAI, model_id: str) -> None:
    prompt = "Numbers: one, two, three,"
    r = client.completions.create(model=model_id, prompt=prompt, echo=True, logprobs=1, max_tokens=6, temperature=0)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt)
    ends = lp.text_offset[1:] + [len(choice.text)]
    for token, start, end in zip(lp.tokens, lp.text_offset, ends):
        assert choice.text[start:end] == token, (token, start, end)
    n_prompt = r.usage.prompt_tokens
    assert lp.text_offset[n_prompt] == len(prompt), "the first generated token starts after the echoed prompt"
    assert len(lp.tokens) == n_prompt + len([t for t in lp.token_logprobs[n_prompt:]])


def test_batched_token_id_prompts_are_scored_each_alone(client: openai.OpenAI, model_id: str) -> None:
    a, _, _, _ = generated(client, model_id, "Two plus two is", 1)
    b, _, _, _ = generated(client, model_id, "A short poem about the sea:", 1)
    batched = client.completions.create(model=model_id, prompt=[a, b], echo=True, logprobs=1, max_tokens=0)
    assert [c.index for c in batched.choices] == [0, 1]
    for ids, choice in zip([a, b], batched.choices):
        alone = client.completions.create(model=model_id, prompt=ids, echo=True, logprobs=1, max_tokens=0).choices[0]
        assert choice.text == alone.text
        assert len(choice.logprobs.token_logprobs) == len(ids)
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(alone.logprobs.token_logprobs[1:], abs=1e-5)
    assert batched.usage.prompt_tokens == len(a) + len(b)


def test_chat_prompt_logprobs_match_the_completions_scoring(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=2, temperature=0,
        extra_body={"prompt_logprobs": 2, "return_token_ids": True},
    )
    ids = ext(r.choices[0])["prompt_token_ids"]
    positions = r.model_extra["prompt_logprobs"]
    assert len(positions) == len(ids) and positions[0] is None
    echoed = client.completions.create(model=model_id, prompt=ids, echo=True, logprobs=2, max_tokens=0).choices[0].logprobs
    for i, (token_id, position) in enumerate(zip(ids[1:], positions[1:]), start=1):
        entry = position[str(token_id)]
        assert entry["logprob"] == pytest.approx(echoed.token_logprobs[i], abs=1e-5)
        assert entry["rank"] >= 1 and isinstance(entry["decoded_token"], str)
        ranks = sorted(v["rank"] for k, v in position.items() if k != str(token_id) or v["rank"] <= 2)
        assert 1 in ranks, position


@pytest.fixture(scope="module")
def training_url() -> Iterator[str]:
    with start_training_hicra(["--admin-key", "adm"]) as url:
        yield url


def test_paused_training_keeps_one_policy_version_while_rewards_arrive(training_url: str, model_id: str) -> None:
    admin = {"Authorization": "Bearer adm"}
    with httpx.Client(base_url=training_url, timeout=120) as http, openai.OpenAI(base_url=f"{training_url}/v1", api_key="none", max_retries=0, timeout=120) as client:
        paused = http.post("/admin/training/pause", headers=admin)
        assert paused.status_code == 200, paused.text
        version = paused.json()["policy_version"]
        assert http.post("/admin/training/pause").status_code == 401, "pausing needs the admin key"

        def reward_a_group(seed: int) -> list[int]:
            r = client.completions.create(model=model_id, prompt="Say yes or no:", n=2, max_tokens=4, temperature=1.0, seed=seed)
            for i, choice in enumerate(r.choices):
                ok = http.post(f"/v1/rollouts/{ext(choice)['rollout_id']}/reward", json={"reward": float(i)})
                assert ok.status_code == 200, ok.text
            return [ext(c)["policy_version"] for c in r.choices]

        # Rewards keep arriving and groups complete, but the policy stays at `version`.
        for seed in range(3):
            assert reward_a_group(seed) == [version, version]
        time.sleep(2.5)
        status = http.get("/v1/training").json()
        assert status["paused"] is True and status["policy_version"] == version
        assert status["ready_groups"] >= 1, status
        scored = client.completions.create(model=model_id, prompt="Say yes", echo=True, logprobs=1, max_tokens=0)
        assert ext(scored.choices[0])["policy_version"] == version

        resumed = http.post("/admin/training/resume", headers=admin)
        assert resumed.status_code == 200 and resumed.json()["paused"] is False
        deadline = time.monotonic() + 120
        while http.get("/v1/training").json()["policy_version"] == version:
            assert time.monotonic() < deadline, "no step after resume"
            time.sleep(0.5)


def test_a_scored_prompt_over_the_context_is_a_400_naming_the_prompt(client: openai.OpenAI, model_id: str, max_context: int) -> None:
    for max_tokens in (0, 2):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model_id, prompt=[5] * (max_context + 1), echo=True, logprobs=1, max_tokens=max_tokens)
        body = err.value.body
        assert body["param"] == "prompt" and body["code"] == "context_length_exceeded", body
        assert f"context limit is {max_context}" in body["message"], body
    # Exactly the context: nothing to generate, but it can be scored.
    scored = client.completions.create(model=model_id, prompt=[5] * max_context, echo=True, logprobs=1, max_tokens=0)
    assert len(scored.choices[0].logprobs.token_logprobs) == max_context
