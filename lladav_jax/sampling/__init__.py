"""The masked-diffusion sampler (one jitted lax.while_loop) and its step-count schedules.

See `lladav_jax.sampling.core` for the algorithm, the accelerations and the documented deviations
from the original; `lladav_jax.generation` for the host side (text, images, buckets, decoding).
"""
from lladav_jax.sampling.core import (TRACE_COUNTS, SamplerInputs, SamplerOutput, SamplerSettings, find_stop,
                                      sample, select)
from lladav_jax.sampling.schedule import count_table, shift_counts, uniform_counts

__all__ = ["SamplerSettings", "SamplerInputs", "SamplerOutput", "sample", "select", "find_stop", "count_table",
           "shift_counts", "uniform_counts", "TRACE_COUNTS"]
