r"""Attention implementations side by side in one run: forward + backward time (and, for the op, the
gradients' error against dense float32 attention at the highest matmul precision).

    python bench/attention.py                         # 1024, 2048, 4096 tokens; the op and the mid LLM
    python bench/attention.py --tokens 2048 --repeats 5 --block 512
    python bench/attention.py --impls dense,blockwise,cudnn,pallas_gpu --dtype bfloat16   # on a GPU

Two figures a length, one sample, a tenth of it padding (segment 0):
  op   `model.attention` alone at config.mid's attention shape (8 heads of 64, GQA off), grad of a sum.
  llm  config.mid's language model (8 layers, d = 512, ~60M parameters), grad of the mean hidden state.
Each is jitted and compiled first; the time is the median of `--repeats` runs (block_until_ready).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lladav_jax import config  # noqa: E402
from lladav_jax.model import abstract_model, attention as attn  # noqa: E402
from lladav_jax.model.common import random_like  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def segments(length: int):
  s = np.ones((1, length), np.int32)
  s[0, length - length // 10:] = 0
  return jnp.asarray(s)


def op_grads(impl: str, length: int, block: int, dtype: str):
  """The jitted gradient of sum(attention) at config.mid's attention shape, and its inputs."""
  c = config.mid().llm
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, length, c.num_heads, c.head_dim)), dtype) for _ in range(3))
  seg = segments(length)
  w = jnp.asarray(rng.normal(size=(1, length, c.num_heads, c.head_dim)), jnp.float32)  # a non-uniform cotangent

  @jax.jit
  def f(q, k, v):
    loss = lambda q, k, v: jnp.sum(w * attn.attention(q, k, v, seg, seg, impl=impl, block_q=block,  # noqa: E731
                                                      block_kv=block).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return f, (q, k, v)


@functools.lru_cache
def reference_grads(length: int, block: int):
  """The gradients of dense float32 attention at the highest precision: once a length, for every kernel."""
  with jax.default_matmul_precision("highest"):
    rf, rargs = op_grads("dense", length, block, "float32")
    return rf(*rargs)


def op_time(impl: str, length: int, block: int, repeats: int, dtype: str = "float32"):
  """(seconds, the gradients' largest relative error against dense float32 at the highest precision)."""
  f, args = op_grads(impl, length, block, dtype)
  t = timed(f, *args, repeats=repeats)
  ref = reference_grads(length, block)
  got = f(*args)
  err = max(float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r)) for g, r in zip(got, ref))
  return t, err


def llm_time(impl: str, length: int, block: int, repeats: int, dtype: str = "float32"):
  cfg = config.mid(attention_impl=impl, attention_block_q=block, attention_block_kv=block, dtype=dtype)
  graphdef, abstract = abstract_model(cfg)
  params = jax.tree.map(jnp.asarray, random_like(abstract, 0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.llm.vocab_size, (1, length)), jnp.int32)
  pos, seg = jnp.arange(length)[None], segments(length)

  @jax.jit
  def f(params):
    def loss(p):
      llm = nnx.merge(graphdef, p).llm
      return jnp.mean(llm(llm.embed_tokens(tokens), pos, seg))
    return jax.grad(loss)(params)

  return timed(f, params, repeats=repeats), None


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", default="1024,2048,4096")
  p.add_argument("--block", type=int, default=512, help="query and key block of the blockwise kernel")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--what", default="op,llm")
  p.add_argument("--impls", default="dense,blockwise", help="the first is the one the others are timed against")
  p.add_argument("--dtype", default="float32")
  a = p.parse_args()
  impls = a.impls.split(",")
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, {a.dtype}, "
        f"block {a.block}, median of {a.repeats}, forward + backward, seconds; op error: the gradients' largest "
        "relative error (norm) against dense float32 at the highest precision")
  print("| what | tokens | " + " | ".join(f"{i} s" for i in impls) + " | " +
        " | ".join(f"{i} / {impls[0]}" for i in impls[1:]) + " | op error " + " / ".join(impls) + " |")
  print("|---" * (2 + 2 * len(impls)) + "|")
  for what in a.what.split(","):
    fn = {"op": op_time, "llm": llm_time}[what]
    for n in (int(x) for x in a.tokens.split(",")):
      res = []
      for impl in impls:
        try:
          res.append(fn(impl, n, a.block, a.repeats, a.dtype))
        except Exception as e:  # an implementation this backend cannot run: named, the others still timed
          print(f"{what} {n} {impl}: {type(e).__name__}: {str(e)[:200]}", flush=True)
          res.append((float("nan"), None))
      ts = [t for t, _ in res]
      errs = " / ".join("-" if e is None else f"{e:.1e}" for _, e in res)
      print(f"| {what} | {n} | " + " | ".join(f"{t:.4f}" for t in ts) + " | " +
            " | ".join(f"{t / ts[0]:.2f}" for t in ts[1:]) + f" | {errs} |", flush=True)


if __name__ == "__main__":
  main()
