"""Agent episodes through the official OpenAI client: calls tied by `extra_body={"hicra":
{"episode_id": ...}}` form one token sequence, trained on exactly the served tokens.

The server here trains (`--train`, its own state folder) and renders chats with a template that
re-renders earlier assistant turns differently from how they were served (upper-cased: a
stand-in for templates that strip reasoning, reformat tool-call JSON or trim whitespace). So
the re-rendered history can never reproduce the served tokens, and only splicing can.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from conftest import start_hicra

# SmolLM2's template, except that assistant turns of the history are upper-cased.
TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' + message['content'] | upper + '<|im_end|>' + '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM = "You are a calculator. Reply with the result only."


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix="hicra-episodes-"))
    (folder / "template.jinja").write_text(TEMPLATE)
    (folder / "trainer.toml").write_text("[optim]\nlr = 1e-3\n[lora]\nrank = 4\n")
    args = [
        "--max-context", "768", "--train-config", str(folder / "trainer.toml"), "--state-dir", str(folder / "state"),
        "--chat-template", str(folder / "template.jinja"), "--max-staleness", "none",
    ]
    with start_hicra(args) as url:
        yield url


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def call(client: openai.OpenAI, model: str, messages: list, episode: str, seed: int, stream: bool = False):
    """One call of an episode; returns (content, hicra extension)."""
    extra = {"hicra": {"episode_id": episode}, "return_token_ids": True}
    if stream:
        content, hicra = "", None
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=1.0, seed=seed, stream=True, extra_body=extra):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                hicra = (choice.model_extra or {}).get("hicra") or hicra
        return content, hicra
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=1.0, seed=seed, extra_body=extra)
    return r.choices[0].message.content, r.choices[0].model_extra["hicra"]


def three_turns(client: openai.OpenAI, model: str, episode: str, seed: int, stream_last: bool = False):
    """Ask, give feedback, ask again, three times; returns the messages and each call's extension."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 3?"}]
    replies = []
    for turn in range(3):
        content, hicra = call(client, model, messages, episode, seed + turn, stream=stream_last and turn == 2)
        replies.append(hicra)
        messages.append({"role": "assistant", "content": content})
        messages.append({"role": "user", "content": f"Checked. Next: what is {turn + 4} + 1?"})
    return messages, replies


def sampled_spans(episode: dict) -> list[list[int]]:
    segment = episode["segments"][-1]
    return [segment["tokens"][s["start"]:s["end"]] for s in segment["spans"] if s["kind"] == "sampled"]


def test_three_turns_train_on_exactly_the_served_ids(client: openai.OpenAI, http: httpx.Client, model_id: str) -> None:
    messages, replies = three_turns(client, model_id, "exact", seed=1, stream_last=True)
    assert [r["episode"]["segment"] for r in replies] == [0, 0, 0]
    assert [r["episode"]["spliced_turns"] for r in replies] == [0, 1, 2]
    episode = http.get("/v1/episodes/exact").json()
    assert len(episode["segments"]) == 1 and episode["turns"] == 3
    # Every sampled span is exactly what a call returned.
    assert sampled_spans(episode) == [r["token_ids"] for r in replies]
    # Each call's prompt is the previous sequence plus new context: the history was spliced.
    segment = episode["segments"][0]
    for reply in replies:
        prompt = reply["prompt_token_ids"]
        assert segment["tokens"][: len(prompt)] == prompt
    # The second call's prompt holds the first call's sampled ids verbatim; the template's own
    # rendering of the same history (no episode) does not.
    first, second = replies[0], replies[1]
    at = len(first["prompt_token_ids"])
    assert second["prompt_token_ids"][at : at + len(first["token_ids"])] == first["token_ids"]
    rerendered = client.chat.completions.create(
        model=model_id, messages=messages[:4], max_tokens=1, temperature=0, extra_body={"return_token_ids": True}
    ).choices[0].model_extra["hicra"]["prompt_token_ids"]
    assert rerendered != second["prompt_token_ids"]
    assert rerendered[at : at + len(first["token_ids"])] != first["token_ids"]


def test_masks_cover_sampled_tokens_only(client: openai.OpenAI, http: httpx.Client, model_id: str) -> None:
    _, replies = three_turns(client, model_id, "masks", seed=11)
    episode = http.get("/v1/episodes/masks").json()
    segment = episode["segments"][0]
    spans = segment["spans"]
    assert spans[0]["start"] == 0 and spans[-1]["end"] == len(segment["tokens"])
    assert all(a["end"] == b["start"] for a, b in zip(spans, spans[1:])), "spans tile the segment"
    assert [s["kind"] for s in spans] == ["context", "sampled"] * 3
    for span, reply in zip([s for s in spans if s["kind"] == "sampled"], replies):
        assert span["rollout_id"] == reply["rollout_id"]
        assert len(span["logprobs"]) == span["end"] - span["start"] == len(reply["token_ids"])
        assert span["policy_version_first"] <= span["policy_version_last"]
    # The training rollout of the episode masks exactly the sampled tokens.
    reply = http.post("/v1/episodes/masks/reward", json={"reward": 1.0, "group_id": "masks-task", "group_size": 2})
    assert reply.status_code == 200, reply.text
    rollout_id = reply.json()["rewards"][0]["rollout_id"]
    assert rollout_id.startswith("episode-masks-0-")
    rollout = http.get(f"/v1/rollouts/{rollout_id}").json()
    first = spans[1]["start"]
    expected = [any(s["start"] <= first + i < s["end"] for s in spans if s["kind"] == "sampled") for i in range(len(rollout["completion_token_ids"]))]
    assert rollout["sampled_mask"] == expected
    assert rollout["prompt_token_ids"] + rollout["completion_token_ids"] == segment["tokens"][: spans[-1]["end"]]
    # An episode is rewarded once.
    again = http.post("/v1/episodes/masks/reward", json={"reward": 0.0, "group_id": "masks-task"})
    assert again.status_code == 409


def test_episode_rewards_make_a_step(client: openai.OpenAI, http: httpx.Client, model_id: str) -> None:
    before = http.get("/v1/training").json()["policy_version"]
    for name, seed, reward in [("step-a", 21, 1.0), ("step-b", 31, 0.0)]:
        three_turns(client, model_id, name, seed=seed)
        reply = http.post(f"/v1/episodes/{name}/reward", json={"reward": reward, "group_id": "step-task", "group_size": 2})
        assert reply.status_code == 200, reply.text
    assert reply.json()["rewards"][0]["status"] == "complete"
    deadline = time.monotonic() + 120
    while (status := http.get("/v1/training").json())["policy_version"] <= before:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    step = next(s for s in reversed(status["last_steps"]) if "step-task" in s.get("trained_groups", []))
    assert step["updated"] and step["tokens"] > 0
    # Only sampled tokens were trained: 3 turns of at most 10 tokens per episode.
    assert step["tokens"] <= 2 * 3 * 10
    missing = http.post("/v1/episodes/step-a/reward", json={"reward": 1.0})
    assert missing.status_code == 400 and "group_id" in missing.text


def test_an_edited_history_starts_a_new_segment(client: openai.OpenAI, http: httpx.Client, model_id: str) -> None:
    messages, replies = three_turns(client, model_id, "edited", seed=41)
    messages[2]["content"] = "I edited this answer."
    _, hicra = call(client, model_id, messages, "edited", seed=99)
    assert hicra["episode"]["new_segment"] and hicra["episode"]["segment"] == 1
    assert "differs" in hicra["episode"]["reason"]
    episode = http.get("/v1/episodes/edited").json()
    assert [s["index"] for s in episode["segments"]] == [0, 1]
    # The new segment holds the edited history as context and the new tokens as sampled.
    assert sampled_spans(episode) == [hicra["token_ids"]]


def test_tool_call_follow_up_is_answered(client: openai.OpenAI, model_id: str) -> None:
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_bad_episode_requests_are_refused(client: openai.OpenAI, http: httpx.Client, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=2, extra_body={"hicra": {"episode_id": "many"}})
    with pytest.raises(openai.BadRequestError, match="episode_i"):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={"hicra": {"episode_idd": "typo"}})
    assert http.get("/v1/episodes/never-seen").status_code == 404
    assert http.post("/v1/episodes/never-seen/reward", json={"reward": 1.0, "group_id": "g"}).status_code == 404


def greedy_episode(client: openai.OpenAI, model: str, episode: str, turns: int = 4) -> list[list[float]]:
    """A greedy multi-turn episode; returns each turn's token logprobs."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 3?"}]
    logprobs = []
    for turn in range(turns):
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                           extra_body={"hicra": {"episode_id": episode}})
        choice = r.choices[0]
        logprobs.append([t.logprob for t in choice.logprobs.content])
        messages.append({"role": "assistant", "content": choice.message.content})
        messages.append({"role": "user", "content": f"Checked. Next: what is {turn + 4} + 1?"})
    return logprobs


def reused_tokens(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("hicra_prefix_reused_tokens_total "))


def test_prefix_reuse_serves_the_same_logprobs(model_id: str) -> None:
    """Two untrained servers, one reusing cached prefixes across turns and one prefilling every
    prompt whole, serve the same greedy episode with the same logprobs."""
    folder = Path(tempfile.mkdtemp(prefix="hicra-reuse-"))
    (folder / "template.jinja").write_text(TEMPLATE)
    runs = {}
    for name, flags in [("reuse", []), ("whole", ["--no-prefix-reuse"])]:
        with start_hicra(["--max-context", "768", "--chat-template", str(folder / "template.jinja"), *flags]) as url:
            with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as c:
                runs[name] = (greedy_episode(c, model_id, "reuse"), reused_tokens(url))
    (with_reuse, reused), (without, none) = runs["reuse"], runs["whole"]
    assert reused > 0, "the later turns must reuse the earlier turns' keys and values"
    assert none == 0
    assert [len(t) for t in with_reuse] == [len(t) for t in without]
    gap = max(abs(a - b) for x, y in zip(with_reuse, without) for a, b in zip(x, y))
    assert gap <= 1e-5, f"logprobs with and without prefix reuse differ by {gap}"


def test_a_credit_plugin_sees_the_turns(model_id: str) -> None:
    """The test plugin `turn_credit` (SDK ABI 2) scales each turn's advantage by its number:
    the advantages the step trained with show it received the episodes' turns."""
    from conftest import REPO

    plugin = REPO / "target" / "release" / "libhicra_test_turn_credit.so"
    assert plugin.is_file(), f"{plugin} missing: run cargo build --release --workspace first"
    folder = Path(tempfile.mkdtemp(prefix="hicra-turn-credit-"))
    (folder / "template.jinja").write_text(TEMPLATE)
    args = ["--max-context", "768", "--train", "--state-dir", str(folder / "state"), "--chat-template", str(folder / "template.jinja"),
            "--max-staleness", "none", "--plugin", str(plugin), "--credit-plugin", "turn_credit"]
    with start_hicra(args) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as c, httpx.Client(base_url=url, timeout=120) as http:
            for name, seed, reward in [("turns-a", 51, 1.0), ("turns-b", 61, 0.0)]:
                three_turns(c, model_id, name, seed=seed)
                assert http.post(f"/v1/episodes/{name}/reward", json={"reward": reward, "group_id": "turns", "group_size": 2}).status_code == 200
            deadline = time.monotonic() + 120
            while http.get("/v1/training").json()["policy_version"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            rows = {r["id"]: r for r in http.get("/v1/rollouts", params={"rewarded": "true", "limit": 100}).json()["data"]}
    for name, sign in [("turns-a", 1.0), ("turns-b", -1.0)]:
        row = next(r for id_, r in rows.items() if id_.startswith(f"episode-{name}-0-"))
        mask, advantages = row["sampled_mask"], row["advantages"]
        assert len(advantages) == len(mask)
        turn, expected = 0, []
        for i, sampled in enumerate(mask):
            if sampled and (i == 0 or not mask[i - 1]):
                turn += 1
            expected.append(sign * 0.5 * turn if sampled else 0.0)
        assert turn == 3
        assert advantages == pytest.approx(expected), name


def test_an_episode_is_rewarded_once_even_by_concurrent_requests(client: openai.OpenAI, http: httpx.Client, model_id: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    three_turns(client, model_id, "twice", seed=71)
    body = {"reward": 1.0, "group_id": "twice-task", "group_size": 3}
    with ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(lambda _: http.post("/v1/episodes/twice/reward", json=body).status_code, range(4)))
    assert codes == [200, 409, 409, 409], codes
    # A later call of the rewarded episode starts a new segment, which can be rewarded.
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 1 + 1?"}]
    _, hicra = call(client, model_id, messages, "twice", seed=72)
    assert hicra["episode"]["new_segment"], hicra["episode"]
