"""Structured outputs and the request shapes agent frameworks send, through the official client.

Content parts, `response_format` with a JSON schema over many samples at temperature 1, a
forced tool call from the default model (whose template knows no tools), vLLM's guided
extensions, every sampling field's effect and its record in the rollout, refusal of fields
hicra does not implement, and the header listing unknown ones.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from conftest import start_hicra, start_training_hicra

REPO = Path(__file__).resolve().parents[2]
IGNORED_HEADER = "x-hicra-ignored-fields"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}},
]


def ext(choice) -> dict:
    return (choice.model_extra or {})["hicra"]


def valid_person(value: object) -> bool:
    """PERSON's constraints, checked by hand."""
    return (
        isinstance(value, dict)
        and set(value) == {"name", "age", "role"}
        and isinstance(value["name"], str) and len(value["name"]) <= 16
        and isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 120
        and value["role"] in ("admin", "user", "guest")
    )


def test_text_content_parts_render_exactly_as_their_joined_text(client: openai.OpenAI, model_id: str) -> None:
    as_strings = [
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one, please."},
    ]
    as_parts = [
        {"role": "developer", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "Another one, "}, {"type": "text", "text": "please."}]},
    ]
    prompts = []
    for messages in (as_strings, as_parts):
        response = client.chat.completions.create(model=model_id, messages=messages, max_tokens=4, temperature=0, extra_body={"return_token_ids": True})
        prompts.append((ext(response.choices[0])["prompt_token_ids"], response.choices[0].message.content))
    assert prompts[0] == prompts[1]


def test_tool_results_and_system_messages_take_content_parts(client: openai.OpenAI, model_id: str) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with the tool's result."}]},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "-3 degrees, "}, {"type": "text", "text": "snow"}]},
    ]
    response = client.chat.completions.create(model=model_id, messages=messages, max_tokens=4, temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
])
def test_image_and_audio_parts_are_refused_naming_the_part_type(client: openai.OpenAI, model_id: str, part: dict) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_id, messages=messages, max_tokens=4)
    message = err.value.body["message"]
    assert part["type"] in message and "text only" in message and "content[1]" in message, message


def test_json_schema_output_parses_and_validates_over_many_samples_at_temperature_one(client: openai.OpenAI, model_id: str) -> None:
    response = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Invent a user of a web site."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        temperature=1.0, n=16, seed=7, max_tokens=48,
    )
    finished = [c for c in response.choices if c.finish_reason == "stop"]
    assert len(finished) >= 14, [c.finish_reason for c in response.choices]
    for choice in finished:
        value = json.loads(choice.message.content)
        assert valid_person(value), value


def test_json_object_and_batched_rows_with_different_constraints(client: openai.OpenAI, model_id: str) -> None:
    """Rows decoded in one batch each follow their own constraint (or none)."""
    def ask(i: int):
        if i % 3 == 0:
            fmt = {"response_format": {"type": "json_object"}}
        elif i % 3 == 1:
            fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}
        else:
            fmt = {}
        return i, client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": f"Describe user number {i}."}],
            temperature=1.0, seed=i, max_tokens=48, **fmt,
        )

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(ask, range(6)))
    for i, response in results:
        choice = response.choices[0]
        if i % 3 == 2 or choice.finish_reason != "stop":
            continue
        value = json.loads(choice.message.content)
        assert isinstance(value, dict), (i, value)
        if i % 3 == 1:
            assert valid_person(value), value


def test_a_named_tool_choice_makes_the_default_model_call_it_validly(client: openai.OpenAI, model_id: str) -> None:
    response = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "What is the weather like in Paris?"}],
        tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        temperature=1.0, seed=3, max_tokens=64,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and isinstance(arguments["city"], str), arguments
    assert arguments["unit"] in ("celsius", "fahrenheit"), arguments


def test_required_tool_choice_calls_one_of_the_tools(client: openai.OpenAI, model_id: str) -> None:
    response = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=WEATHER_TOOLS, tool_choice="required", temperature=0, max_tokens=96,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    assert all(c.function.name in ("get_weather", "get_time") for c in choice.message.tool_calls)
    for call in choice.message.tool_calls:
        assert isinstance(json.loads(call.function.arguments), dict)


def test_vllm_guided_extensions_constrain_completions(client: openai.OpenAI, model_id: str) -> None:
    regex = client.completions.create(model=model_id, prompt="My phone number is", max_tokens=16, temperature=1.0, seed=1, extra_body={"guided_regex": r" \d{3}-\d{4}"})
    assert re.fullmatch(r" \d{3}-\d{4}", regex.choices[0].text), regex.choices[0].text
    choice = client.completions.create(model=model_id, prompt="Is the sky green? Answer:", max_tokens=4, temperature=1.0, n=6, seed=2, extra_body={"structured_outputs": {"choice": [" yes", " no"]}})
    assert {c.text for c in choice.choices} <= {" yes", " no"}
    grammar = client.completions.create(model=model_id, prompt="Count:", max_tokens=12, temperature=1.0, seed=3, extra_body={"guided_grammar": 'start: " " NUM ("," NUM)*\nNUM: /[0-9]/'})
    assert re.fullmatch(r" [0-9](,[0-9])*", grammar.choices[0].text), grammar.choices[0].text


@pytest.mark.parametrize("body,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, "nonsense"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"response_format": {"type": "xml"}}, "xml"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "one structured-output field"),
    ({"tools": WEATHER_TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
])
def test_invalid_constraints_are_400s_naming_the_problem(client: openai.OpenAI, model_id: str, body: dict, needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=body)
    assert needle in err.value.body["message"], err.value.body


def first_tokens(client: openai.OpenAI, model_id: str, n: int = 1, **fields) -> list[int]:
    response = client.completions.create(model=model_id, prompt="The cat sat on the", max_tokens=n, temperature=0, extra_body={"return_token_ids": True, **fields})
    return ext(response.choices[0])["token_ids"]


def test_logit_bias_moves_the_greedy_choice(client: openai.OpenAI, model_id: str) -> None:
    (greedy,) = first_tokens(client, model_id)
    (pushed,) = first_tokens(client, model_id, logit_bias={"1000": 100})
    assert pushed == 1000
    (banned,) = first_tokens(client, model_id, logit_bias={str(greedy): -100})
    assert banned != greedy


def test_min_p_one_keeps_only_the_best_token(client: openai.OpenAI, model_id: str) -> None:
    greedy = first_tokens(client, model_id, n=12)
    response = client.completions.create(model=model_id, prompt="The cat sat on the", max_tokens=12, temperature=1.0, seed=5, extra_body={"return_token_ids": True, "min_p": 1.0})
    assert ext(response.choices[0])["token_ids"] == greedy


@pytest.mark.parametrize("field,value", [("frequency_penalty", 2.0), ("presence_penalty", 2.0), ("repetition_penalty", 1.8)])
def test_penalties_cut_repetition_and_are_recorded_with_the_rollout(client: openai.OpenAI, http: httpx.Client, model_id: str, field: str, value: float) -> None:
    prompt = "one two one two one two one two"
    def repeats(**fields) -> tuple[int, dict]:
        response = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0, extra_body={"return_token_ids": True, **fields})
        ids = ext(response.choices[0])["token_ids"]
        return len(ids) - len(set(ids)), ext(response.choices[0])
    plain, _ = repeats()
    penalised, hicra = repeats(**{field: value})
    assert penalised < plain, (field, plain, penalised)
    stored = http.get(f"/v1/rollouts/{hicra['rollout_id']}").json()
    assert stored["sampling"][field] == value, stored["sampling"]


def test_a_constraint_is_recorded_with_the_rollout(client: openai.OpenAI, http: httpx.Client, model_id: str) -> None:
    response = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=24, response_format={"type": "json_object"})
    stored = http.get(f"/v1/rollouts/{ext(response.choices[0])['rollout_id']}").json()
    assert stored["sampling"]["constraint"] == {"kind": "json_object"}, stored["sampling"]


@pytest.mark.parametrize("field,value", [
    ("frequency_penalty", 2.5),
    ("presence_penalty", -3.0),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("top_p", 0.0),
    ("logit_bias", {"42": 150}),
])
def test_sampling_values_out_of_range_are_refused_by_name(client: openai.OpenAI, model_id: str, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={field: value})
    assert err.value.body["param"] == field and field in err.value.body["message"], err.value.body


@pytest.mark.parametrize("field,value", [
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "high"),
])
def test_known_fields_hicra_does_not_implement_are_refused_by_name(client: openai.OpenAI, model_id: str, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={field: value})
    assert err.value.body["param"] == field and field in err.value.body["message"], err.value.body


def test_unknown_fields_are_listed_in_a_header_and_harmless_ones_are_not(client: openai.OpenAI, model_id: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        metadata={"run": "pytest"}, store=False, extra_body={"made_up_knob": 3, "another_one": True, "modalities": ["text"]},
    )
    assert raw.headers.get(IGNORED_HEADER) == "another_one, made_up_knob"
    raw = client.completions.with_raw_response.create(model=model_id, prompt="hi", max_tokens=2)
    assert IGNORED_HEADER not in raw.headers


@pytest.fixture(scope="module")
def hermes_url() -> Iterator[str]:
    """The default model with Qwen2.5's chat template: tools rendered, `<tool_call>` parsed."""
    template = REPO / "core/tests/fixtures/chat/Qwen-Qwen2.5-7B-Instruct.jinja"
    with start_hicra(["--max-context", "512", "--chat-template", str(template)]) as url:
        yield url


def test_strict_tools_in_auto_mode_make_every_written_call_valid(hermes_url: str, model_id: str) -> None:
    """The default model rarely calls a tool on its own: a logit bias toward the opening tag's
    tokens makes it write tags often, and everything after a tag must then be a valid call.
    The same request without `strict` shows what the grammar prevents."""
    call_start = '\n{"name": "get_weather", "arguments": {"'

    def sample(strict: bool) -> tuple[int, list[str]]:
        tools = [dict(WEATHER_TOOLS[0], function=dict(WEATHER_TOOLS[0]["function"], strict=strict))]
        with openai.OpenAI(base_url=f"{hermes_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            tag = client.completions.create(model=model_id, prompt="<tool_call>", max_tokens=1, extra_body={"return_token_ids": True})
            tag_ids = ext(tag.choices[0])["prompt_token_ids"][:2]
            response = client.chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": "What is the weather like in Paris?"}],
                tools=tools, tool_choice="auto", temperature=1.0, n=8, seed=11, max_tokens=96,
                logit_bias={str(i): 8 for i in tag_ids},
            )
        calls, texts = 0, []
        for choice in response.choices:
            for call in choice.message.tool_calls or []:
                calls += 1
                if strict:
                    arguments = json.loads(call.function.arguments)
                    assert call.function.name == "get_weather" and set(arguments) == {"city", "unit"}, call
                    assert arguments["unit"] in ("celsius", "fahrenheit"), arguments
            texts.append(choice.message.content or "")
        return calls, texts

    def stray_tags(texts: list[str]) -> int:
        """Tags in the text not followed by the start of a call (or a cut-off piece of one)."""
        parts = [part for text in texts for part in text.split("<tool_call>")[1:]]
        return sum(1 for part in parts if not (part.startswith(call_start) or call_start.startswith(part)))

    calls, texts = sample(strict=True)
    assert calls + sum(t.count("<tool_call>") for t in texts) > 0, "the bias should make the model open calls"
    assert stray_tags(texts) == 0, texts
    assert stray_tags(sample(strict=False)[1]) > 0, "without strict the biased model writes stray tags"


@pytest.fixture(scope="module")
def training_url() -> Iterator[str]:
    with start_training_hicra(["--groups-per-step", "1"]) as url:
        yield url


def test_constrained_rollouts_train_at_ratio_one_through_the_server(training_url: str, model_id: str) -> None:
    """A group sampled under a JSON schema and penalties, rewarded, is trained by the server's
    trainer under the same mask: the step's ratio deviation is rounding, not a distribution gap."""
    with httpx.Client(base_url=training_url, timeout=120) as http, openai.OpenAI(base_url=f"{training_url}/v1", api_key="none", max_retries=0, timeout=120) as client:
        response = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Invent a user."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            temperature=1.0, n=4, seed=21, max_tokens=40, frequency_penalty=0.5, extra_body={"min_p": 0.05},
        )
        for i, choice in enumerate(response.choices):
            ok = http.post(f"/v1/rollouts/{ext(choice)['rollout_id']}/reward", json={"reward": float(i)})
            assert ok.status_code == 200, ok.text
        deadline = time.monotonic() + 120
        while True:
            status = http.get("/v1/training").json()
            if status["counters"]["steps"] + status["counters"]["failed_steps"] >= 1:
                break
            assert time.monotonic() < deadline, f"no step: {status}"
            time.sleep(0.25)
        step = status["last_steps"][-1]
        assert status["counters"]["failed_steps"] == 0 and not step["rejected_groups"], step
        assert step["ratio_deviation_max"] < 1e-3, step
        assert step["clip_fraction"] == 0, step
