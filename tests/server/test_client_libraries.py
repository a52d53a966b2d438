"""The real client libraries agent harnesses use, unchanged, against the real server: openai-agents (a
function-tool agent, streamed, over Chat Completions and over Responses), langchain-openai (`bind_tools`
streaming, `with_structured_output` in every method), instructor (JSON_SCHEMA and TOOLS, partial
streaming) and litellm (plain, streamed, tools). The anthropic SDK is in test_anthropic.py.

The tiny random-weight model is enough where a grammar decides the output (a forced tool call, a strict
schema); LangChain's json_mode only asks for a JSON object, so the default model writes that one."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import pytest
from pydantic import BaseModel, Field

# No library phones home while the tests run (no network at test time): no Agents SDK tracing export,
# litellm's cost map from its own package instead of GitHub, no LangSmith tracing.
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LANGCHAIN_TRACING_V2", "false")
os.environ.setdefault("LANGSMITH_TRACING", "false")


class Weather(BaseModel):
    """Weather in a city."""
    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=7)


def _weather_tool_schema() -> dict:
    return {"type": "function", "function": {"name": "get_weather", "description": "weather for a city",
                                             "parameters": Weather.model_json_schema()}}


@pytest.fixture
def short_replies(tiny_server):
    """The random-weight model ends a reply (EOS) once it has written SHORT tokens, wherever the grammar, if any,
    allows an end: free text stops after SHORT tokens; a forced tool call still runs to its closing tag. So a
    turn answered in text ends as `completed`, not on max_tokens (the Responses model of the Agents SDK raises
    on `response.incomplete`). A sequence with speculative drafts has a row per draft after its own (row j
    stands at output position len + j), so each row at or past SHORT gets the push."""
    def install(e):
        orig, eos = e.runner.execute, list(e.eos_ids)[0]

        def execute(so):
            seqs, logits = orig(so)
            if seqs and logits is not None:
                r = 0
                for s in seqs:
                    rows = 1 + len(s.draft_token_ids)
                    for j in range(rows):
                        if len(s.output_token_ids) + j >= SHORT:
                            logits[r + j, eos] = logits[r + j].max() + 10
                    r += rows
            return seqs, logits
        e.runner.execute = execute

    tiny_server.state.aengine.call(install).result(30)
    yield
    tiny_server.state.aengine.call(lambda e: e.runner.__dict__.pop("execute")).result(30)


SHORT = 6

# ------------------------------------------------------------------------------------------ openai-agents


def _run_agent(base_url: str, model_cls: str) -> tuple[list[str], object, list[dict]]:
    import agents
    from agents import Agent, ModelSettings, Runner, function_tool
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    calls: list[dict] = []

    @function_tool
    def weather(city: Annotated[str, Field(max_length=4)]) -> str:
        """Weather in a city."""
        calls.append({"city": city})
        return "sunny"

    async def main():
        client = AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120)
        model = getattr(agents, model_cls)(model="tiny", openai_client=client)
        # tool_choice "required" on the first turn: the random-weight model never picks a tool by itself; the
        # SDK resets it to auto after the tool ran (reset_tool_choice), so the second turn answers in text
        # (the tiny model's 1,024-token context holds the tool prompt, the call, its result and a short answer)
        agent = Agent(name="weather", tools=[weather], model=model,
                      model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=80))
        res = Runner.run_streamed(agent, "Weather in Oslo?", max_turns=4)
        kinds = [ev.data.type if ev.type == "raw_response_event" else getattr(ev, "name", ev.type)
                 async for ev in res.stream_events()]
        await client.close()
        return kinds, res

    kinds, res = asyncio.run(main())
    return kinds, res, calls


@pytest.mark.parametrize("model_cls", ["OpenAIChatCompletionsModel", "OpenAIResponsesModel"])
def test_agents_sdk_function_tool_streamed(tiny_server, short_replies, model_cls):
    from agents.items import ToolCallItem, ToolCallOutputItem

    kinds, res, calls = _run_agent(tiny_server.url, model_cls)
    assert res.is_complete and isinstance(res.final_output, str) and res.final_output
    assert len(calls) >= 1  # the tool ran with arguments the model wrote
    items = res.new_items
    assert any(isinstance(i, ToolCallItem) for i in items) and any(isinstance(i, ToolCallOutputItem) for i in items)
    # streamed as generated: the call's arguments in several fragments, then the answer's text
    assert kinds.count("response.function_call_arguments.delta") >= 2 and "response.output_text.delta" in kinds
    assert kinds.index("tool_called") < kinds.index("tool_output") < kinds.index("message_output_created")
    assert isinstance(calls[0]["city"], str) and len(calls[0]["city"]) <= 4
    assert len(res.raw_responses) >= 2  # the tool turn, then the answer


# --------------------------------------------------------------------------------------- langchain-openai


def _chat_openai(url: str, model: str = "tiny", **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=url + "/v1", api_key="none", temperature=0, max_retries=0, timeout=120,
                      **kw)


def test_langchain_bind_tools_streams_tool_call_chunks(tiny_server):
    llm = _chat_openai(tiny_server.url, max_tokens=110).bind_tools([Weather], tool_choice="Weather")
    chunks = list(llm.stream("What is the weather in Paris?"))
    frags = [tc for ch in chunks for tc in ch.tool_call_chunks]
    assert frags[0]["name"] == "Weather" and frags[0]["id"]
    assert sum(1 for f in frags if f["args"]) >= 2  # the arguments arrive in fragments, as generated
    whole = chunks[0]
    for ch in chunks[1:]:
        whole = whole + ch
    assert len(whole.tool_calls) == 1 and whole.tool_calls[0]["name"] == "Weather"
    Weather.model_validate(whole.tool_calls[0]["args"])
    # the same request non-streamed gives the same call
    call = llm.invoke("What is the weather in Paris?").tool_calls[0]
    assert call["args"] == whole.tool_calls[0]["args"]


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output_tiny(tiny_server, method):
    llm = _chat_openai(tiny_server.url, max_tokens=110)
    out = llm.with_structured_output(Weather, method=method, strict=True).invoke("What is the weather in Paris?")
    assert isinstance(out, Weather)


# ------------------------------------------------------------------------------------------------ instructor

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor_create_and_partial_stream(tiny_server, mode):
    import instructor

    client = instructor.from_openai(tiny_server.client(), mode=getattr(instructor.Mode, mode))
    kw = dict(model="tiny", response_model=Weather, messages=ASK, max_tokens=110, temperature=0, max_retries=1)
    whole = client.chat.completions.create(**kw)
    assert isinstance(whole, Weather)
    partials = list(client.chat.completions.create_partial(**kw))
    # several partial objects as the JSON streams in, the last one whole and valid (not equal to `whole`:
    # instructor names the schema PartialWeather when streaming, a different prompt for the random model)
    assert len(partials) >= 2 and partials[0].days is None
    last = Weather.model_validate(partials[-1].model_dump())
    assert len({(p.city, p.days) for p in partials}) >= 2 and 1 <= last.days <= 7


# --------------------------------------------------------------------------------------------------- litellm


def _litellm(url: str, **kw):
    import litellm

    litellm.telemetry = False
    return litellm.completion(model="openai/tiny", api_base=url + "/v1", api_key="none", messages=ASK,
                              temperature=0, num_retries=0, timeout=120, **kw)


def test_litellm_plain_and_streamed(tiny_server):
    r = _litellm(tiny_server.url, max_tokens=12, extra_body={"ignore_eos": True})
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and text and r.usage.completion_tokens == 12
    chunks = list(_litellm(tiny_server.url, max_tokens=12, stream=True, extra_body={"ignore_eos": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 3 and "".join(deltas) == text  # as generated, and the same greedy text


def test_litellm_tools(tiny_server):
    tools = [_weather_tool_schema()]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = _litellm(tiny_server.url, max_tokens=110, tools=tools, tool_choice=choice)
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    Weather.model_validate_json(call.function.arguments)
    chunks = list(_litellm(tiny_server.url, max_tokens=110, tools=tools, tool_choice=choice, stream=True))
    frags = [tc.function.arguments for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])
             if tc.function.arguments]
    assert len(frags) >= 2 and "".join(frags) == call.function.arguments


# ------------------------------------------------------------------------- json_mode: the default model


@pytest.mark.slow
def test_langchain_json_mode_default_model(default_server):
    # json_mode asks only for a JSON object (the keys come from the prompt), so this needs a model that reads
    # the prompt; the JSON-object grammar keeps it well-formed and closing before max_tokens
    llm = _chat_openai(default_server.url, model="default", max_tokens=60)
    out = llm.with_structured_output(Weather, method="json_mode").invoke(
        "Return a JSON object with the keys city (a string) and days (an integer from 1 to 7) for: the weather in "
        "Paris for the next 3 days.")
    assert isinstance(out, Weather) and "paris" in out.city.lower() and out.days == 3
