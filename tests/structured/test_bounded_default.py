"""Structured output that terminates on the default model: schemas without any bounds of their own (as
instructor, LangChain and `chat.completions.parse` send them) close well before max_tokens, greedy and
sampled, and the result validates against the schema as given. json_object bounds nothing (any number
of members may follow), so sampled at 0.8 most draws close early and some ramble: over seeds 1-12, ten
closed within 3/4 of max_tokens (6 to 86 tokens), one at 157 and one reached max_tokens."""

from __future__ import annotations

import json

import jsonschema
import pytest

from kvstrata import LLM
from kvstrata.core import FinishReason, SamplingParams
from kvstrata.tokenizer.json_bounds import bound_numbers
from kvstrata.tokenizer.tools import render_chat

pytestmark = pytest.mark.slow

USER = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"], "title": "User"}
# Numbers, nested: arrays without maxItems stay unbounded (a bound would change what the schema
# means), and the 135M model, greedy, repeats array items until max_tokens; so none here.
MEASURE = {"type": "object", "properties": {"city": {"type": "string"}, "temperature": {"type": "number"},
                                            "where": {"type": "object", "properties": {
                                                "lat": {"type": "number"}, "lon": {"type": "number"}},
                                                "required": ["lat", "lon"]}},
           "required": ["city", "temperature", "where"]}
PROMPTS = {
    "user": ("Extract the user: Jason is 25 years old.", USER),
    "measure": ("Give the temperature in Paris today and where Paris is, as JSON.", MEASURE),
    "count": ("Count from one to a very large number, as JSON with one integer field `n`.",
              {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),
}
MAX_TOKENS = 160
JSON_OBJECT_SEEDS = (1, 2, 3, 4, 5, 6)


@pytest.fixture(scope="module")
def outputs():
    llm = LLM("default", kv_device_bytes="256M")
    tok = llm.tokenizer
    prompts, params, kinds = [], [], []
    for name, (text, schema) in PROMPTS.items():
        prompt = render_chat(tok, [{"role": "user", "content": text}])
        for temp, seed in ((0.0, None), (0.8, 1), (0.8, 2)):
            prompts.append(prompt)
            params.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=temp, seed=seed,
                                         structured={"type": "json_schema", "schema": schema, "strict": True}))
            kinds.append((name, schema))
    for seed in JSON_OBJECT_SEEDS:
        prompts.append(render_chat(tok, [{"role": "user", "content": "Describe Paris (its country and population) as a JSON object."}]))
        params.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=seed,
                                     structured={"type": "json_object"}))
        kinds.append(("json_object", {"type": "object"}))
    outs = llm.generate(prompts, params)
    return list(zip(kinds, outs))


def test_every_output_closes_well_before_max_tokens(outputs):
    early = 0
    for (name, schema), out in outputs:
        o = out.outputs[0]
        if name == "json_object":  # (unbounded: see the module docstring)
            early += o.finish_reason == FinishReason.STOP and len(o.token_ids) < MAX_TOKENS * 3 // 4
            if o.finish_reason == FinishReason.STOP:
                jsonschema.validate(json.loads(o.text), schema)
            continue
        assert o.finish_reason == FinishReason.STOP, (name, o.text)
        assert len(o.token_ids) < MAX_TOKENS * 3 // 4, (name, len(o.token_ids), o.text)
        jsonschema.validate(json.loads(o.text), schema)
    assert early >= len(JSON_OBJECT_SEEDS) - 2, early


def test_bounds_keep_the_schema_own_and_add_only_what_is_missing():
    s = bound_numbers({"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "number", "minimum": 0, "maximum": 1},
        "c": {"type": ["number", "null"]}, "d": {"type": "number", "multipleOf": 0.5}}})
    p = s["properties"]
    assert (p["a"]["minimum"], p["a"]["maximum"]) == (-(2**53 - 1), 2**53 - 1)
    assert (p["b"]["minimum"], p["b"]["maximum"], p["b"]["multipleOf"]) == (0, 1, 1e-6)
    assert p["c"]["maximum"] == 10**15 and p["c"]["multipleOf"] == 1e-6
    assert p["d"]["multipleOf"] == 0.5
