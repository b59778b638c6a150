"""An OpenAI-compatible server on the inference engine: `python -m lladav_jax.serve MODEL_DIR`.

`__main__` (the command line, SIGTERM drain), `config` (what the flags fix), `app` (the routes),
`protocol` (the request, response and chunk bodies; `ChatRequest.to_sampling_params`), `serving_chat`
(messages -> prompt, the request -> engine jobs, events -> the response or its chunks), `metrics`
(Prometheus), `images` (image URLs through the training data's loader). The engine thread is
`lladav_jax.inference.scheduler`."""
