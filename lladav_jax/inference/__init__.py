"""Everything between a prompt and an answer (no HTTP, no command line).

    params.py      SamplingParams: one request's settings, their defaults and validation
    prompts.py     prompts -> expanded, left-padded, bucketed engine requests
    runner.py      EngineRunner / run_engine: continuous batching over one engine; RowResult
    generation.py  generate / generate_ids: offline batches -> GenerationResult
    scheduler.py   the server's engine thread: jobs in, typed events (Prefix, Denoise, Done, Failed) out
    text.py        stop lists, answer ids -> text
    elbo.py        the Monte-Carlo ELBO
    model.py       InferenceModel: what this package reads from a model
    engine/        the jitted engine: config, state, forward passes, decision, caches, schedules, the loop
"""
from lladav_jax.inference.generation import GenerationResult, Trajectory, generate, generate_ids
from lladav_jax.inference.model import InferenceModel
from lladav_jax.inference.params import ParamsError, SamplingParams

__all__ = ["SamplingParams", "ParamsError", "GenerationResult", "Trajectory", "generate", "generate_ids",
           "InferenceModel"]
