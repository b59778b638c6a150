"""Input-pipeline throughput: samples/s of the full pipeline (decode, tile, tokenise, label,
expand, batch) on the demo data, on large synthetic photos and on 720p H.264 videos, in-process and
with workers; and the video decoder alone (decoded frames/s, peak memory).

    python bench/data.py [--workers 0 2] [--seconds 20] [--large-size 2000x1500]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lladav_jax import multimodal  # noqa: E402
from lladav_jax.data import pipeline  # noqa: E402
from lladav_jax.data.demo_data import demo_data_config, demo_image_config, ensure_demo_data  # noqa: E402
from lladav_jax.data.tokenizer import Tokenizer  # noqa: E402


def large_images(root: str, n: int, size: tuple[int, int]) -> str:
  """n JPEG 'photos' (gradients + shapes) and a LLaVA JSON referencing them."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  w, h = size
  yy, xx = np.mgrid[0:h, 0:w]
  recs = []
  for i in range(n):
    a = np.stack([(xx * (i + 1) // 7) % 256, (yy * 3 // (i + 2)) % 256, ((xx + yy) // 5) % 256], -1).astype(np.uint8)
    img = Image.fromarray(a)
    d = ImageDraw.Draw(img)
    for _ in range(20):
      x, y = rng.integers(0, w - 200), rng.integers(0, h - 200)
      d.ellipse((int(x), int(y), int(x) + 180, int(y) + 150), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    img.save(os.path.join(root, f"img{i}.jpg"), quality=90)
    recs.append({"id": f"L{i}", "image": f"img{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]})
  path = os.path.join(root, "large.json")
  with open(path, "w") as f:
    json.dump(recs, f)
  return path


def measure(cfg, tok, image_cfg, batch_size: int, seconds: float, min_batches: int = 3):
  it = pipeline.build_train_iterator(cfg, tok, image_cfg, batch_size_per_process=batch_size, process_index=0,
                                     process_count=1, seed=0)
  t0 = time.perf_counter()
  next(it)  # startup (worker spawn) excluded from the rate
  first = time.perf_counter() - t0
  n, t1 = 0, time.perf_counter()
  while n < min_batches or time.perf_counter() - t1 < seconds:
    b = next(it)
    n += 1
  dt = time.perf_counter() - t1
  mb = sum(v.nbytes for v in b.values()) / 2**20
  if cfg.num_workers:
    it.close()
  return {"first_batch_s": first, "batches": n, "samples_per_s": n * batch_size / dt, "batch_MiB": mb}


def videos(root: str, n: int, seconds: int = 10, fps: int = 30, size=(1280, 720)) -> str:
  """n H.264 mp4 clips (moving gradients, PyAV) and a LLaVA JSON referencing them."""
  import av
  os.makedirs(root, exist_ok=True)
  w, h = size
  yy, xx = np.mgrid[0:h, 0:w]
  recs = []
  for i in range(n):
    path = os.path.join(root, f"clip{i}.mp4")
    if not os.path.exists(path):
      with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for t in range(seconds * fps):
          a = np.stack([(xx + 4 * t) % 256, (yy + 2 * t * (i + 1)) % 256, ((xx + yy) // 4 + t) % 256], -1)
          for p in s.encode(av.VideoFrame.from_ndarray(a.astype(np.uint8), format="rgb24")):
            c.mux(p)
        for p in s.encode():
          c.mux(p)
    recs.append({"id": str(i), "video": f"clip{i}.mp4", "conversations": [
        {"from": "human", "value": "<image>\nWhat moves in the video?"}, {"from": "gpt", "value": "colour bands"}]})
  out = os.path.join(root, "videos.json")
  with open(out, "w") as f:
    json.dump(recs, f)
  return out


def decoder(path: str, frames_upbound: int = 32) -> str:
  """decode_video on one clip as the training pipeline samples it: decoded frames/s and the peak RSS growth
  (run in a fresh process: `--decode PATH`)."""
  import resource
  from lladav_jax.data import records
  pick = lambda total, fps: records.sample_frame_indices(total, fps, frames_upbound=frames_upbound)[0]
  import av
  with av.open(path) as c:
    total = c.streams.video[0].frames
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t = time.perf_counter()
  with open(path, "rb") as f:
    frames = records.decode_video(f, path, pick, max_pixels=10 ** 8)
  dt = time.perf_counter() - t
  rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**10
  return (f"decoder: {os.path.basename(path)} {frames[0].size[0]}x{frames[0].size[1]}, {total} frames -> "
          f"{len(frames)} kept: {dt:.2f} s, {total / dt:.0f} decoded frames/s, peak RSS +{rss:.0f} MiB")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  ap.add_argument("--seconds", type=float, default=15.0)
  ap.add_argument("--large-size", default="2000x1500")
  ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "lladav_bench_data"))
  ap.add_argument("--decode", default=None, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.decode:
    print(decoder(a.decode))
    return
  demo = ensure_demo_data(os.path.join(a.root, "demo"))
  tok = Tokenizer.from_dir(demo["tokenizer_dir"])
  w, h = (int(x) for x in a.large_size.split("x"))
  large = large_images(os.path.join(a.root, f"large{w}x{h}"), 16, (w, h))
  full = multimodal.ImageConfig()  # 384 px tiles, anyres_max_4 over (1x1)..(6x6), as LLaDA-V
  n_tiles = multimodal.process_image(Image.new("RGB", (w, h)), full).num_tiles
  vids = videos(os.path.join(a.root, "video720p"), 4)
  clip = os.path.join(os.path.dirname(vids), "clip0.mp4")
  print(subprocess.run([sys.executable, __file__, "--decode", clip], capture_output=True, text=True).stdout.strip(),
        flush=True)

  def file_cfg(path, tiles):
    def make():
      return pipeline.DataConfig(path=path, image_folder=os.path.dirname(path), seq_len=8192, tile_budget=tiles)
    return make

  rows = []
  for name, make_cfg, image_cfg, bs in (
      ("demo 56px (2 tiles)", lambda: demo_data_config(demo), demo_image_config(), 16),
      (f"{w}x{h} JPEG ({n_tiles} tiles of 384)", file_cfg(large, n_tiles), full, 2),
      ("720p H.264 10 s (10 frames at 1 fps)", file_cfg(vids, 10), full, 2)):
    for nw in a.workers:
      cfg = make_cfg().replace(num_workers=nw)
      r = measure(cfg, tok, image_cfg, bs, a.seconds)
      rows.append((name, nw, bs, r))
      print(f"{name:34s} workers={nw} batch={bs:2d}: {r['samples_per_s']:8.1f} samples/s  "
            f"(batch {r['batch_MiB']:.1f} MiB, first batch {r['first_batch_s']:.1f} s)", flush=True)
  print("\n| data | workers | batch | samples/s | batch MiB |\n|---|---|---|---|---|")
  for name, nw, bs, r in rows:
    print(f"| {name} | {nw} | {bs} | {r['samples_per_s']:.1f} | {r['batch_MiB']:.1f} |")
  print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
