"""Serving: `alignkit serve` (an OpenAI-compatible HTTP API with continuous batching and a web chat page) and
`alignkit chat` (a terminal chat).

The web stack (starlette, uvicorn) is an optional extra, imported only by `alignkit.serve.server` and
`alignkit.serve.api`, so `import alignkit` works without it.
"""
