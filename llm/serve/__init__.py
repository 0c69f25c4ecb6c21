"""Serving: the chosen model on Ray Serve behind an OpenAI-compatible API with continuous batching.

`app` (the Serve deployment and builder), `routes` (FastAPI), `service` (limits, auth, models),
`engine` + `batch` + `sampling` (continuous batching), `text` (detokenization, stop strings),
`stage` (`llmray serve`), `serveconfig` (`serve/*.yaml`), `vllm` (the GPU route).
"""
