r"""Blockwise vs dense attention on CPU, both in one run: forward + backward time.

    python bench/attention.py                         # 1024, 2048, 4096 tokens; the op and the mid LLM
    python bench/attention.py --tokens 2048 --repeats 5 --block 512

Two figures a length, one sample, a tenth of it padding (segment 0):
  op   `model.attention` alone at config.mid's attention shape (8 heads of 64, GQA off), grad of a sum.
  llm  config.mid's language model (8 layers, d = 512, ~60M parameters), grad of the mean hidden state.
Each is jitted and compiled first; the time is the median of `--repeats` runs (block_until_ready).
"""
from __future__ import annotations

import argparse
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


def op_time(impl: str, length: int, block: int, repeats: int) -> float:
  c = config.mid().llm
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, length, c.num_heads, c.head_dim)), jnp.float32) for _ in range(3))
  seg = segments(length)

  @jax.jit
  def f(q, k, v):
    loss = lambda q, k, v: jnp.sum(attn.attention(q, k, v, seg, seg, impl=impl, block_q=block, block_kv=block))  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return timed(f, q, k, v, repeats=repeats)


def llm_time(impl: str, length: int, block: int, repeats: int) -> float:
  cfg = config.mid(attention_impl=impl, attention_block_q=block, attention_block_kv=block)
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

  return timed(f, params, repeats=repeats)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", default="1024,2048,4096")
  p.add_argument("--block", type=int, default=512, help="query and key block of the blockwise kernel")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--what", default="op,llm")
  a = p.parse_args()
  print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs, block {a.block}, median of {a.repeats}, "
        "forward + backward, seconds")
  print("| what | tokens | dense s | blockwise s | blockwise / dense |")
  print("|---|---|---|---|---|")
  for what in a.what.split(","):
    fn = {"op": op_time, "llm": llm_time}[what]
    for n in (int(x) for x in a.tokens.split(",")):
      d = fn("dense", n, a.block, a.repeats)
      b = fn("blockwise", n, a.block, a.repeats)
      print(f"| {what} | {n} | {d:.3f} | {b:.3f} | {b / d:.2f} |", flush=True)


if __name__ == "__main__":
  main()
