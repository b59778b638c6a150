"""A bounded soak of the server (slow: run by hand, `pytest -m slow tests/test_serve_soak.py -s`): a few
thousand mixed requests (half short text, a quarter long text, an eighth each one and two pictures, answer lengths 8 to 64, blocks of 8, 16 or
the whole answer, streamed or not), some clients leaving mid-answer and some bad inputs, from 16 clients at
once. Every good request is answered, every bad one gets its 400, the server's memory is flat after the first
few hundred requests, no program is compiled after warm-up, and no row is busy at the end.
`LLADAV_SOAK_REQUESTS` sets the count (default 2000)."""
from __future__ import annotations

import asyncio
import os
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving import ServerProcess, write_tiny_model

pytestmark = pytest.mark.slow


def rss_mb(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def metric(url: str, name: str) -> float:
  text = httpx.get(url + "/metrics").text
  return float(next((line.split()[1] for line in text.splitlines() if line.startswith(name + " ")), 0))


def test_soak(tmp_path):
  n = int(os.environ.get("LLADAV_SOAK_REQUESTS", 2000))
  model_dir, _ = write_tiny_model(str(tmp_path))
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for k in range(4):
    Image.fromarray(rng.integers(0, 255, (64 + 16 * k, 96, 3), np.uint8)).save(images / f"{k}.png")
  srv = ServerProcess(model_dir, "--max-num-seqs", "4", "--max-queue", "64", "--image-root", str(images),
                      log_path=str(tmp_path / "server.log"))
  url = srv.url
  try:
    compiled = metric(url, "lladav_compiles")
    long_q = " ".join(["Count every shape in the picture and name each colour."] * 8)
    outcome: dict[str, int] = {}
    rss: list[tuple[int, float]] = []

    def body(k: int) -> tuple[str, dict]:
      r = np.random.default_rng(k)
      gen = int(r.choice([8, 16, 24, 32, 48, 64]))
      block = int(r.choice([b for b in (8, 16, gen) if gen % b == 0]))
      kind = int(r.choice(4, p=[0.5, 0.25, 0.125, 0.125]))  # short text, long text, one picture, two
      pics = [f"{int(r.integers(4))}.png" for _ in range(kind - 1)] if kind >= 2 else []
      text = long_q if kind == 1 else "What colour is the shape?"
      content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": p}} for p in pics]
      b = {"model": "tiny-lladav", "messages": [{"role": "user", "content": content}], "max_tokens": gen,
           "block_length": block, "steps": gen, "temperature": float(r.choice([0.0, 0.7])), "seed": k,
           "stream": bool(r.integers(2))}
      roll = r.random()
      if roll < 0.05:
        return "bad", {**b, "temperature": -1}
      if roll < 0.08:
        return "bad", {**b, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                       "image_url": {"url": "../x.png"}}]}]}
      if roll < 0.12:
        return "leave", {**b, "stream": True}
      return "good", b

    async def one(client: httpx.AsyncClient, k: int):
      kind, b = body(k)
      if kind == "leave":  # the first chunk, then the connection closes
        async with client.stream("POST", url + "/v1/chat/completions", json=b, timeout=300) as r:
          async for _ in r.aiter_lines():
            break
        outcome["left"] = outcome.get("left", 0) + 1
        return
      if b["stream"]:
        text, status = "", None
        async with client.stream("POST", url + "/v1/chat/completions", json=b, timeout=300) as r:
          status = r.status_code
          async for line in r.aiter_lines():
            text += line
        ok = status == 200 and text.rstrip().endswith("[DONE]")
      else:
        r = await client.post(url + "/v1/chat/completions", json=b, timeout=300)
        status, ok = r.status_code, r.status_code == 200 and r.json()["choices"][0]["finish_reason"] is not None
      key = f"{kind} {status}" if kind == "bad" or not ok else "good 200"
      outcome[key] = outcome.get(key, 0) + 1

    async def main():
      sem = asyncio.Semaphore(16)
      async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as client:
        async def guarded(k):
          async with sem:
            await one(client, k)
            if k % 100 == 99:
              rss.append((k + 1, rss_mb(srv.proc.pid)))
        await asyncio.gather(*(guarded(k) for k in range(n)))

    t0 = time.monotonic()
    asyncio.run(main())
    deadline = time.monotonic() + 60
    while metric(url, "lladav_busy_rows") > 0 or metric(url, "lladav_queue_depth") > 0:
      assert time.monotonic() < deadline, "rows still busy after the last request"
      time.sleep(0.2)
    rss.sort()
    print(f"\n{n} requests in {time.monotonic() - t0:.0f} s: {outcome}; server RSS MB by requests: "
          f"{[(k, round(m)) for k, m in rss]}; encoder cache hits {metric(url, 'lladav_mm_cache_hits'):g}, "
          f"misses {metric(url, 'lladav_mm_cache_misses'):g}; useful positions "
          f"{metric(url, 'lladav_useful_positions') / max(1, metric(url, 'lladav_processed_positions')):.0%}")
    good = sum(1 for k in range(n) if body(k)[0] == "good")
    assert outcome.get("good 200", 0) == good, outcome
    assert outcome.get("bad 400", 0) == sum(1 for k in range(n) if body(k)[0] == "bad"), outcome
    assert metric(url, "lladav_compiles") == compiled
    settled = [m for k, m in rss if k >= min(400, n // 2)]
    assert max(settled) - min(settled) < 0.05 * min(settled) + 30, rss  # flat: no per-request growth
    assert srv.proc.poll() is None
  finally:
    srv.stop()
