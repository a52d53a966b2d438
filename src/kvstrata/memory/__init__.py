"""What lies beyond the context window (docs/memory.md): compaction that keeps the cache, and recall
over embeddings of every session's messages.

    from kvstrata.memory import Recall, compact
"""

from kvstrata.memory.compaction import CompactionError, CompactionPolicy, compact, maybe_compact
from kvstrata.memory.recall import Recall, message_text
from kvstrata.memory.tools import MEMORY_SEARCH, is_memory_search, memory_search_tool

__all__ = ["CompactionError", "CompactionPolicy", "MEMORY_SEARCH", "Recall", "compact", "is_memory_search",
           "maybe_compact", "memory_search_tool", "message_text"]
