"""An OpenAI-compatible server on the sampler engine: `python -m lladav_jax.serve MODEL_DIR`.

`app` (routes, metrics, the page), `schema` (the request body), `images` (image URLs through the training
data's loader), `scheduler` (the engine thread: continuous batching, streaming), `__main__` (the command
line, SIGTERM drain)."""
