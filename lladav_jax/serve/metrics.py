"""The Prometheus series of one server (its own registry), served at /metrics."""
from __future__ import annotations

import collections
import threading
import time

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lladav_jax.inference.scheduler import Scheduler

_COUNTS = {"programs": 0, "cache_hits": 0}  # XLA programs built by this process; of them, read from the cache


def _count_program(event: str, *args, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":  # a compile or a persistent-cache read
    _COUNTS["programs"] += 1


def _count_cache_hit(event: str, *args, **kwargs):
  if event == "/jax/compilation_cache/cache_hits":
    _COUNTS["cache_hits"] += 1


jax.monitoring.register_event_duration_secs_listener(_count_program)
jax.monitoring.register_event_listener(_count_cache_hit)


def compiles() -> int:
  """Programs compiled by this process (one read from the persistent compilation cache is not compiled)."""
  return _COUNTS["programs"] - _COUNTS["cache_hits"]


class Metrics:

  def __init__(self, sched: Scheduler, window_s: float = 10.0):
    r = self.registry = CollectorRegistry()
    self.requests = Counter("lladav_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
    Gauge("lladav_queue_depth", "Answers waiting for an engine row", registry=r).set_function(lambda: sched.queue_depth)
    Gauge("lladav_busy_rows", "Engine rows holding an answer", registry=r).set_function(lambda: sched.busy_rows)
    Gauge("lladav_useful_positions", "Sequence positions of the running requests' own prompts and answers, summed "
          "over denoising steps", registry=r).set_function(lambda: sched.position_counts()[0])
    Gauge("lladav_processed_positions", "Sequence positions the engine's passes ran (buckets and idle rows of a "
          "row group included), summed over steps", registry=r).set_function(lambda: sched.position_counts()[1])
    Gauge("lladav_mm_cache_hits", "Image tiles whose features were in the encoder cache",
          registry=r).set_function(lambda: sched.features.hits)
    Gauge("lladav_mm_cache_misses", "Image tiles the vision tower encoded",
          registry=r).set_function(lambda: sched.features.misses)
    Gauge("lladav_mm_cache_bytes", "Bytes of tile features in the encoder cache",
          registry=r).set_function(lambda: sched.features.bytes)
    self.tokens = Counter("lladav_generated_tokens", "Answer tokens generated", registry=r)
    self.nfe = Counter("lladav_forward_evaluations", "Forward evaluations (2 a step with CFG)", registry=r)
    Gauge("lladav_compiles", "XLA programs compiled since the process started (warm-up included)",
          registry=r).set_function(compiles)
    Gauge("lladav_compile_cache_hits", "XLA programs read from the persistent compilation cache",
          registry=r).set_function(lambda: _COUNTS["cache_hits"])
    Gauge("lladav_tokens_per_second", f"Answer tokens a second over the last {window_s:g} s",
          registry=r).set_function(lambda: self._rate(1))
    Gauge("lladav_forward_evaluations_per_second", f"Forward evaluations a second over the last {window_s:g} s",
          registry=r).set_function(lambda: self._rate(2))
    buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, float("inf"))
    self.latency = Histogram("lladav_request_latency_seconds", "Arrival to the last answer", buckets=buckets,
                             registry=r)
    self.ttft = Histogram("lladav_time_to_first_token_seconds", "Arrival to the first final answer text",
                          buckets=buckets, registry=r)
    self.window_s = window_s
    self.recent: collections.deque = collections.deque()  # (time, tokens, nfe) of recent job ends
    self.lock = threading.Lock()

  def job_ended(self, tokens: int, nfe: int):
    self.tokens.inc(tokens)
    self.nfe.inc(nfe)
    with self.lock:
      self.recent.append((time.monotonic(), tokens, nfe))

  def _rate(self, k: int) -> float:
    now = time.monotonic()
    with self.lock:
      while self.recent and self.recent[0][0] < now - self.window_s:
        self.recent.popleft()
      return sum(e[k] for e in self.recent) / self.window_s
