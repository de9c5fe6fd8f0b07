"""`qwen2-serve`: an OpenAI- and Anthropic-compatible local server (docs: docs/server.md).

cli.py (arguments, loading, uvicorn) · app.py (Starlette routes, API key, streaming) ·
openai_api.py / anthropic_api.py (request parsing, response shapes) · protocol.py (shared
validators and the engine's `Job`) · tools.py (Qwen2.5 tool calls) · engine.py (the generation
thread: continuous batch, prefix cache).
"""
