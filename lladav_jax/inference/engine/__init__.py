"""The jitted masked-diffusion engine: rows that each run their own request (loop.py has the algorithm).

    state = init(graphdef, cfg, shapes, weights)                  # empty rows
    feats = encode(graphdef, weights, pixels)                     # the vision tower: tiles -> features
    state = insert(graphdef, cfg, weights, state, row, request)   # the prompt (features spliced), row reset
    state = advance(graphdef, cfg, weights, state, max_steps)     # one jitted lax.while_loop
    state = drop(state, row)                                      # an abandoned row stops running
"""
from lladav_jax.inference.engine.config import CACHES, MODES, STOP_RULES, EngineConfig, RowParams
from lladav_jax.inference.engine.loop import advance, drop, encode, insert
from lladav_jax.inference.engine.state import TRACE_COUNTS, EngineShapes, EngineState, Request, init

__all__ = ["EngineConfig", "RowParams", "EngineShapes", "EngineState", "Request", "init", "encode", "insert", "advance", "drop",
           "TRACE_COUNTS", "CACHES", "MODES", "STOP_RULES"]
