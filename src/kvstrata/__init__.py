"""kvstrata: an inference engine for agentic LLM workloads, built around a KV memory hierarchy."""

__version__ = "0.1.0"

from kvstrata.core import SamplingParams, RequestClass  # noqa: E402


def __getattr__(name: str):
    # The LLM class pulls in torch; import it lazily so `kvstrata plan` and the core types stay light.
    if name == "LLM":
        from kvstrata.engine.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestClass", "__version__"]
