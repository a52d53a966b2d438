"""The OpenAI-compatible HTTP server with durable sessions (see docs/server.md).

    from kvstrata.server import create_app
    app = create_app(AsyncEngine(LLMEngine(...)), open_store("sessions.db"), model_names=["default"])
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    # create_app (the HTTP stack, FastAPI) is imported on first use, so the CLI's parser can read
    # server/limits.py without importing FastAPI and torch
    if name == "create_app":
        from kvstrata.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
