"""The OpenAI-compatible HTTP server with durable sessions (see docs/server.md).

    from kvstrata.server import create_app
    app = create_app(AsyncEngine(LLMEngine(...)), open_store("sessions.db"), model_names=["default"])
"""

from kvstrata.server.app import create_app

__all__ = ["create_app"]
