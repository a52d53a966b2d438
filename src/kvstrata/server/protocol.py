"""Request bodies of the HTTP API, as pydantic models (they also make the OpenAPI schema at /openapi.json).

Fields follow OpenAI's API; unknown fields are accepted and ignored (the official client sends new
ones over time), and kvstrata's extensions are marked as such. Range checks that SamplingParams does
again are repeated here so the OpenAPI schema documents them.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

RequestClassName = Literal["interactive", "batch"]
_EXAMPLE_MESSAGES = [{"role": "user", "content": "Say hello."}]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Lenient):
    """Sampling fields shared by every generating route (OpenAI's names, plus extensions)."""

    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    stop: Union[str, list[str], None] = None
    user: Optional[str] = None
    # kvstrata extensions (vLLM's names)
    top_k: Optional[int] = Field(None, ge=-1, description="kvstrata extension: 0 or -1 disables")
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0, description="kvstrata extension")
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=10.0, description="kvstrata extension")
    ignore_eos: bool = Field(False, description="kvstrata extension: keep generating past EOS")
    request_class: Optional[RequestClassName] = Field(
        None, description="kvstrata extension: interactive (a person waits) or batch (agentic work)")


class ChatCompletionRequest(SamplingFields):
    model: str = Field(..., examples=["default"])
    messages: list[ChatMessage] = Field(..., min_length=1, examples=[_EXAMPLE_MESSAGES])
    max_tokens: Optional[int] = Field(None, ge=1, description="deprecated by OpenAI; max_completion_tokens")
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None


class CompletionRequest(SamplingFields):
    model: str = Field(..., examples=["default"])
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(..., examples=["Once upon a time"])
    max_tokens: Optional[int] = Field(16, ge=1)
    n: int = Field(1, ge=1, le=16)
    best_of: Optional[int] = Field(None, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None


class ResponsesRequest(SamplingFields):
    model: str = Field(..., examples=["default"])
    input: Union[str, list[dict[str, Any]]] = Field(..., examples=["Say hello."])
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[dict[str, Any]] = None
    stream: bool = False
    store: bool = True
    metadata: Optional[dict[str, Any]] = None
    conversation: Union[str, dict[str, Any], None] = Field(
        None, description="a conversation id (or {id}): the input and output are added to it")
    context_management: Optional[list[dict[str, Any]]] = Field(
        None, description='[{"type": "compaction", "compact_threshold": tokens}]: compact first when the prompt would pass it')


# ---------------------------------------------------------------------------------------------- sessions


class SessionCreate(_Lenient):
    system: Optional[str] = Field(None, description="the system prompt")
    tools: Optional[list[dict[str, Any]]] = Field(None, description="OpenAI chat `tools`")
    request_class: RequestClassName = Field("interactive", alias="class")
    messages: list[ChatMessage] = Field(default_factory=list, description="initial messages")
    metadata: Optional[dict[str, Any]] = None


class MessagesAppend(_Lenient):
    messages: list[ChatMessage] = Field(..., min_length=1)


class SessionGenerate(SamplingFields):
    messages: list[ChatMessage] = Field(default_factory=list, description="appended before generating")
    expected_version: Optional[int] = Field(
        None, ge=1, description="generate only while the session is at this version, else 409 version_conflict: "
        "a client that retries a turn whose answer it lost never appends it twice")
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[dict[str, Any]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None


class SessionPark(_Lenient):
    tier: Literal["host", "disk", "remote"] = "disk"
    lease_s: Optional[float] = Field(None, gt=0, description="seconds the KV stays pinned at the tier")


class SessionFork(_Lenient):
    metadata: Optional[dict[str, Any]] = None
