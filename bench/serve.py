"""Server benchmark: a bounded load test of `python -m lladav_jax.serve` on 127.0.0.1 against the same
requests through `LLaDAV.generate` in fixed batches.

    PYTHONPATH=. python bench/serve.py [--rates 2,4,8] [--requests 24] [--max-num-seqs 4] [--max-tokens 32]

The tiny test model (tests/serving.py: demo tokenizer, random weights, `config.tiny`) is written to a
temporary folder and served in a subprocess (one CPU device). Per arrival rate: `--requests` streamed
requests with Poisson arrivals (seeded), each a short text question at temperature 0; measured per request
from its send time: time to first token (the first content delta) and latency (the last chunk).
answers/s and tokens/s: answers and answer tokens over the span from the first send to the last answer.
Fixed batches: the same questions and arrival times through `generate(batch_size=--max-num-seqs)` in
this process (the server idle): a batch starts once its last request has arrived and the previous batch
is done; every request of it gets its answer at the batch's end (latency = time to first token).
Compiles are excluded on both sides (a warm-up request of the same shape). At most
`--requests` x len(rates) requests are sent; each has a timeout.

The server runs with the launch limits MIX_LIMITS (12 lanes: prompt buckets 64, 128, 256, 512, 1024, 2048 x
answer buckets 32, 128), every program compiled at warm-up.

`--mix`: the server alone under mixed traffic against homogeneous traffic of the same mean answer length and
concurrency, at one arrival rate (`--rates`' first; above the server's capacity, e.g. 100, so that the waves
measure it). Both waves send the same prompts at the same times (a quarter each: a short text question, a
long one, one picture, two pictures; three distinct pictures, so that the encoder cache has hits):
homogeneous = 64-token answers in blocks of 32; mixed = `max_tokens` 8 to 120 (mean 64), blocks of 8, 16 or
the whole answer. Per wave: answer positions a second (the requests' max_tokens over the span), p50 / p99
latency and time to first token, the programs compiled during it (`/metrics`' lladav_compiles), useful
positions (the requests' own prompt and answer positions over the positions the passes ran) and the
encoder cache's hits.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from lladav_jax.inference import SamplingParams  # noqa: E402
from tests.serving import ServerProcess, write_tiny_model  # noqa: E402

QUESTIONS = ["What color is the circle?", "How many shapes are there?", "What shape is the red object?",
             "Where is the square?", "Is the triangle blue?", "What is in the image?"]


async def one(client: httpx.AsyncClient, url: str, body: dict, t_send: float) -> dict:
  ttft, tokens = None, 0
  async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
    if r.status_code != 200:
      return {"status": r.status_code}
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      c = json.loads(line[6:])
      if ttft is None and any(ch["delta"].get("content") for ch in c["choices"]):
        ttft = time.perf_counter() - t_send
      if c.get("usage"):
        tokens = c["usage"]["completion_tokens"]
  end = time.perf_counter()
  return {"status": 200, "ttft": ttft if ttft is not None else end - t_send, "latency": end - t_send,
          "tokens": tokens, "end": end}


async def load(url: str, bodies: list[dict], arrivals: np.ndarray) -> list[dict]:
  async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(bodies))) as client:
    t0 = time.perf_counter()

    async def at(k):
      await asyncio.sleep(max(0.0, t0 + arrivals[k] - time.perf_counter()))
      t = time.perf_counter()
      return {**await one(client, url, bodies[k], t), "send": t}

    return list(await asyncio.gather(*(at(k) for k in range(len(bodies)))))


def fixed_batches(model, questions: list[str], arrivals: np.ndarray, rows: int, params) -> list[dict]:
  out = []
  t0 = time.perf_counter()
  free_at = 0.0
  for s in range(0, len(questions), rows):
    qs, arr = questions[s:s + rows], arrivals[s:s + rows]
    start = max(free_at, arr[-1])
    time.sleep(max(0.0, t0 + start - time.perf_counter()))
    res = model.generate(qs, None, params, batch_size=rows)
    end = time.perf_counter() - t0
    free_at = end
    out += [{"latency": end - a, "ttft": end - a, "tokens": len(r.token_ids), "send": t0 + a, "end": t0 + end}
            for r, a in zip(res, arr)]
  return out


def summary(rows: list[dict]) -> dict:
  ok = [r for r in rows if r["status"] == 200] if "status" in rows[0] else rows
  span = max(r["end"] for r in ok) - min(r["send"] for r in ok)
  lat, ttft = np.array([r["latency"] for r in ok]), np.array([r["ttft"] for r in ok])
  return {"answers": len(ok), "answers_s": len(ok) / span, "tokens_s": sum(r["tokens"] for r in ok) / span,
          "p50_latency": float(np.percentile(lat, 50)), "p99_latency": float(np.percentile(lat, 99)),
          "p50_ttft": float(np.percentile(ttft, 50)), "p99_ttft": float(np.percentile(ttft, 99))}


LONG = " ".join(["Look at the picture carefully, count every shape and say which colour each one has."] * 6)


def metric(url: str, name: str) -> float:
  text = httpx.get(url + "/metrics").text
  return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def compiles(url: str) -> float:
  return metric(url, "lladav_compiles")


MIX_LIMITS = ("--max-model-len", "2048", "--max-answer-tokens", "128", "--max-tiles", "5")


def mix(url: str, args, image_dir: str) -> None:
  """Mixed against homogeneous traffic on one server (see the module docstring)."""
  rng = np.random.default_rng(args.seed)
  rate, n = float(args.rates.split(",")[0]), args.requests
  for k in range(3):  # three pictures, each sent by several requests (the encoder cache's hits)
    Image.fromarray(rng.integers(0, 255, (96 + 32 * k, 128, 3), np.uint8)).save(os.path.join(image_dir, f"{k}.png"))

  def body(q, ims, gen, block):
    content = [{"type": "text", "text": q}] + [{"type": "image_url", "image_url": {"url": f"{i}.png"}} for i in ims]
    return {"model": "tiny-lladav", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": gen, "block_length": block, "steps": gen, "stream": True,
            "stream_options": {"include_usage": True}}

  kinds = [(QUESTIONS[k % len(QUESTIONS)], ()) if k % 4 == 0 else (LONG + " " + QUESTIONS[k % len(QUESTIONS)], ())
           if k % 4 == 1 else (QUESTIONS[k % len(QUESTIONS)], (k % 3,)) if k % 4 == 2
           else (QUESTIONS[k % len(QUESTIONS)], (k % 3, (k + 1) % 3)) for k in range(n)]
  homogeneous = [body(q, ims, 64, 32) for q, ims in kinds]
  lengths = rng.permutation([8 + 16 * (k % 8) for k in range(n)])  # 8, 24, ..., 120: mean 64
  mixed = []
  for (q, ims), gen in zip(kinds, (int(g) for g in lengths)):
    mixed.append(body(q, ims, gen, int(rng.choice([b for b in (8, 16, gen) if gen % b == 0]))))
  print(f"tiny model, {args.max_num_seqs} rows, {n} requests a wave at {rate:g}/s (Poisson, the same arrivals and "
        f"prompts each wave: a quarter each short text, long text, one image, two images), {jax_device()}; "
        f"mean answer {sum(b['max_tokens'] for b in mixed) / n:g} tokens in both; limits {' '.join(MIX_LIMITS)}")
  print(f"warm-up: {metric(url, 'lladav_compiles'):g} programs compiled")
  print("| wave | answer positions/s | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s | compiles | "
        "useful positions | encoder cache hits |")
  print("|---|---|---|---|---|---|---|---|---|")
  rows = {}
  arrivals = np.cumsum(rng.exponential(1 / rate, n))
  arrivals -= arrivals[0]
  for name, bodies in (("homogeneous (64 tokens, blocks of 32)", homogeneous),
                       ("mixed (8 to 120 tokens, blocks of 8, 16 or whole)", mixed)):
    c0, u0, p0 = compiles(url), metric(url, "lladav_useful_positions"), metric(url, "lladav_processed_positions")
    h0, m0 = metric(url, "lladav_mm_cache_hits"), metric(url, "lladav_mm_cache_misses")
    served = asyncio.run(load(url, bodies, arrivals))
    ok = [(r, b) for r, b in zip(served, bodies) if r["status"] == 200]
    span = max(r["end"] for r, _ in ok) - min(r["send"] for r, _ in ok)
    s = summary([r for r, _ in ok])
    rows[name] = sum(b["max_tokens"] for _, b in ok) / span
    useful = (metric(url, "lladav_useful_positions") - u0) / max(1.0, metric(url, "lladav_processed_positions") - p0)
    hits, misses = metric(url, "lladav_mm_cache_hits") - h0, metric(url, "lladav_mm_cache_misses") - m0
    print(f"| {name} | {rows[name]:.1f} | {s['p50_latency']:.2f} | {s['p99_latency']:.2f} | {s['p50_ttft']:.2f} | "
          f"{s['p99_ttft']:.2f} | {compiles(url) - c0:g} | {useful:.0%} | {hits:g} of {hits + misses:g} tiles |"
          + ("" if len(ok) == n else f" ({n - len(ok)} refused)"))
  a, b = rows.values()
  print(f"mixed / homogeneous answer positions a second: {b / a:.2f}x")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rates", default="2,4,8", help="arrival rates, requests a second")
  p.add_argument("--requests", type=int, default=24, help="requests a rate")
  p.add_argument("--max-num-seqs", type=int, default=4)
  p.add_argument("--max-tokens", type=int, default=32)
  p.add_argument("--block-length", type=int, default=8)
  p.add_argument("--steps", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--mix", action="store_true", help="mixed against homogeneous traffic (the docstring)")
  args = p.parse_args()
  params = SamplingParams(gen_length=args.max_tokens, block_length=args.block_length, steps=args.steps)
  with tempfile.TemporaryDirectory() as root:
    model_dir, _ = write_tiny_model(root)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir)
    srv = ServerProcess(model_dir, "--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(args.requests),
                        "--image-root", image_dir, limits=MIX_LIMITS, log_path=os.path.join(root, "server.log"))
    try:
      def body(q):
        return {"model": "tiny-lladav", "messages": [{"role": "user", "content": q}], "temperature": 0,
                "max_tokens": args.max_tokens, "block_length": args.block_length, "steps": args.steps,
                "stream": True, "stream_options": {"include_usage": True}}

      asyncio.run(load(srv.url, [body(QUESTIONS[0])], np.zeros(1)))  # compile
      if args.mix:
        return mix(srv.url, args, image_dir)
      from lladav_jax.api import LLaDAV
      model = LLaDAV.from_pretrained(model_dir)
      model.generate(QUESTIONS[:args.max_num_seqs], None, params, batch_size=args.max_num_seqs)  # compile
      rng = np.random.default_rng(args.seed)
      print(f"tiny model, {args.max_tokens}-token answers ({args.block_length}-token blocks, {args.steps} steps), "
            f"{args.max_num_seqs} rows, {args.requests} requests a rate, {jax_device()}")
      print("| arrivals /s | how | answers/s | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s |")
      print("|---|---|---|---|---|---|---|---|")
      for rate in [float(r) for r in args.rates.split(",")]:
        arrivals = np.cumsum(rng.exponential(1 / rate, args.requests))
        arrivals -= arrivals[0]
        qs = [QUESTIONS[k % len(QUESTIONS)] for k in range(args.requests)]
        served = asyncio.run(load(srv.url, [body(q) for q in qs], arrivals))
        refused = sum(r["status"] != 200 for r in served)
        fixed = fixed_batches(model, qs, arrivals, args.max_num_seqs, params)
        for how, s in (("server", summary(served)), ("generate, fixed batches", summary(fixed))):
          print(f"| {rate:g} | {how} | {s['answers_s']:.2f} | {s['tokens_s']:.1f} | {s['p50_latency']:.2f} | "
                f"{s['p99_latency']:.2f} | {s['p50_ttft']:.2f} | {s['p99_ttft']:.2f} |")
        if refused:
          print(f"({refused} requests refused at rate {rate:g})")
    finally:
      srv.stop()


def jax_device() -> str:
  import jax
  return f"{jax.devices()[0].platform} ({os.cpu_count()} cores)"


if __name__ == "__main__":
  main()
