"""`memory_search`, the built-in tool that gives an agent recall over its own earlier conversation
(including what compaction took out of the context). Agent jobs offer it when a task names it; server
sessions and Responses when the client lists `{"type": "memory_search"}` (or a function of that name)
in `tools`, and the server then runs the call itself and continues the turn.
"""

from __future__ import annotations

import json
from typing import Any

from kvstrata.core import KvstrataError

MEMORY_SEARCH = "memory_search"
DEFAULT_K = 5


def memory_search_tool() -> dict[str, Any]:
    """The OpenAI function definition the model sees."""
    return {"type": "function", "function": {
        "name": MEMORY_SEARCH,
        "description": ("Search everything said earlier in this conversation, including turns no longer in "
                        "your context (messages and tool results). Returns the most relevant passages."),
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 200, "description": "what to look for, in a few words"},
            "k": {"type": "integer", "description": f"how many passages (1-20, default {DEFAULT_K})"}},
            "required": ["query"]}}}


def is_memory_search(tool: Any) -> bool:
    if not isinstance(tool, dict):
        return False
    if tool.get("type") == MEMORY_SEARCH:
        return True
    f = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    return tool.get("type") == "function" and f.get("name") == MEMORY_SEARCH


def expand_tools(tools: list[dict] | None) -> list[dict] | None:
    """`{"type": "memory_search"}` entries replaced by the function definition (others unchanged)."""
    if not tools:
        return tools
    return [memory_search_tool() if isinstance(t, dict) and t.get("type") == MEMORY_SEARCH else t for t in tools]


def parse_arguments(arguments: Any) -> tuple[str, int]:
    """(query, k) from a call's arguments (a JSON string or a dict); KvstrataError when malformed."""
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        raise KvstrataError(f"memory_search arguments must be a JSON object, got {str(arguments)[:200]!r}") from None
    if not isinstance(args, dict) or not isinstance(args.get("query"), str) or not args["query"].strip():
        raise KvstrataError("memory_search needs a non-empty string `query`")
    k = args.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 20:
        k = DEFAULT_K
    return args["query"], k


def render_hits(hits: list) -> str:
    """What the model reads: one JSON list of passages, best first."""
    return json.dumps([{"text": h.text, "role": h.role, "message_index": h.idx, "score": round(h.score, 3)}
                       for h in hits], ensure_ascii=False)


async def run_memory_search(recall: Any, owner: Any, session_id: str, arguments: Any) -> tuple[str, str | None]:
    """(content, error) of one call, searching the session's own memory."""
    try:
        query, k = parse_arguments(arguments)
        hits = await recall.search(owner, query, k, session_id=session_id)
    except KvstrataError as e:
        return f"Error: {e}", str(e)
    return render_hits(hits), None
