"""``nanovllm serve``: an OpenAI-compatible HTTP server on the engine.

cli.py (flags, uvicorn) -> api.py (routes, lifespan) -> completions.py / chat.py (OpenAI shapes,
built on serving.py) -> async_engine.py (the engine thread, one queue per request). protocol.py
holds the request models and the error shape, middleware.py the body limit and API key check,
metrics.py the Prometheus metrics and the per-request log line.
"""
