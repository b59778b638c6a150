"""The masked-diffusion sampler: an engine of rows (one jitted lax.while_loop per `advance`), its
settings, the lean per-step decision and the step-count schedules.

See `lladav_jax.sampling.engine` for the algorithm, the caches and the documented deviations from
the original; `lladav_jax.generation` for the host side (text, images, buckets, the engine loop).
"""
from lladav_jax.sampling.decode import chunk_size, decide, first_occurrences, select, update_stop
from lladav_jax.sampling.engine import (TRACE_COUNTS, EngineShapes, EngineState, Request, SamplerInputs, advance,
                                        init, insert)
from lladav_jax.sampling.schedule import count_table, shift_counts, uniform_counts
from lladav_jax.sampling.settings import EngineConfig, RowSettings, SamplerSettings, row_settings

__all__ = ["SamplerSettings", "EngineConfig", "RowSettings", "row_settings", "EngineShapes", "EngineState",
           "Request", "SamplerInputs", "init", "insert", "advance", "decide", "select", "first_occurrences",
           "update_stop", "chunk_size", "count_table", "shift_counts", "uniform_counts", "TRACE_COUNTS"]
