"""lmforge's OpenAI-compatible server: `lmforge serve --model PATH`.

`create_app({id: Engine})` (in `lmforge.serve.app`) builds the FastAPI app; `lmforge.serve.cli`
adds the `serve` verb. This package's `__init__` imports nothing, so the CLI stays fast to start.
"""
