"""ArrayRecord shards of LLaVA records with their image bytes embedded (fast random access).

    python -m lladav_jax.data.arrayrecord SRC.json IMAGE_FOLDER DST_DIR --shards N [--video-folder DIR]

Each record is the LLaVA JSON object plus `_blobs`: {referenced path: base64 bytes} for its
images, video file or frame files. Files that are missing are not embedded (the pipeline then
skips the sample as `missing_image`, counted); malformed JSONL lines are written as they are
(skipped as `malformed_json`). Shards are contiguous runs of the source order, written as
`DST_DIR/data.array_record-SSSSS-of-NNNNN` with group_size:1. The pipeline reads them when
`data.path` is such a file, a glob, or a directory holding them.
"""
from __future__ import annotations

import argparse
import base64
import glob
import json
import os
import sys

import grain

from lladav_jax.data import records

SUFFIX = ".array_record"


def find_shards(path: str) -> list[str]:
  """ArrayRecord files named by `path` (a file, a glob or a directory), else []."""
  if os.path.isdir(path):
    return sorted(f for f in glob.glob(os.path.join(path, "*")) if SUFFIX in os.path.basename(f))
  if any(ch in path for ch in "*?["):
    return sorted(f for f in glob.glob(path) if SUFFIX in os.path.basename(f))
  if SUFFIX in os.path.basename(path) and os.path.isfile(path):
    return [path]
  return []


class ArrayRecordRecords:
  """(key, JSON bytes) from ArrayRecord shards; the reader opens lazily in each process."""

  def __init__(self, files: list[str]):
    self.files = list(files)
    self._src = None
    self._len = len(self._open())

  def _open(self):
    if self._src is None:
      self._src = grain.sources.ArrayRecordDataSource(self.files)
    return self._src

  def __len__(self):
    return self._len

  def __getitem__(self, i: int):
    return f"ar#{int(i)}", self._open()[int(i)]

  def __getstate__(self):
    return {"files": self.files, "_len": self._len, "_src": None}

  def __setstate__(self, d):
    self.__dict__.update(d)

  def __repr__(self):
    return f"ArrayRecordRecords({len(self.files)} shards, {self._len} records)"


def _refs(rec: dict) -> list[tuple[str, str]]:
  """(reference, kind) of every file a record points to."""
  out = []
  im = rec.get("image")
  if im is not None:
    out += [(r, "image") for r in (im if isinstance(im, list) else [im]) if isinstance(r, str)]
  elif rec.get("video") is not None:
    v = rec["video"]
    out += [(r, "video") for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
  return out


def embed(rec: dict, image_folder: str, video_folder: str | None = None) -> tuple[dict, int]:
  """The record with `_blobs` for every referenced file that exists; returns (record, missing)."""
  opener = records.Opener({}, image_folder, video_folder)
  blobs, missing = {}, 0
  for ref, kind in _refs(rec):
    try:
      p = opener.path(ref, kind)
    except records.Skip:  # outside the folder: not embedded (training skips the record, naming why)
      missing += 1
      continue
    if os.path.isfile(p):
      with open(p, "rb") as f:
        blobs[ref] = base64.b64encode(f.read()).decode("ascii")
    else:
      missing += 1
  out = dict(rec)
  if blobs:
    out["_blobs"] = blobs
  return out, missing


def convert(src: str, image_folder: str, dst_dir: str, shards: int = 1, video_folder: str | None = None) -> dict:
  from array_record.python.array_record_module import ArrayRecordWriter
  source = records.json_source(src)
  n = len(source)
  shards = max(1, min(shards, n)) if n else 1
  os.makedirs(dst_dir, exist_ok=True)
  per = -(-n // shards)
  stats = {"records": n, "missing_files": 0, "malformed": 0, "shards": shards}
  for s in range(shards):
    path = os.path.join(dst_dir, f"data{SUFFIX}-{s:05d}-of-{shards:05d}")
    w = ArrayRecordWriter(path, "group_size:1")
    for i in range(s * per, min(n, (s + 1) * per)):
      _, raw = source[i]
      try:
        rec = json.loads(raw)
        if not isinstance(rec, dict):
          raise ValueError
      except ValueError:
        stats["malformed"] += 1
        w.write(raw)
        continue
      rec, missing = embed(rec, image_folder, video_folder)
      stats["missing_files"] += missing
      w.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode())
    w.close()
  return stats


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("src", help="LLaVA .json / .jsonl / .yaml")
  ap.add_argument("image_folder")
  ap.add_argument("dst_dir")
  ap.add_argument("--shards", type=int, default=1)
  ap.add_argument("--video-folder", default=None)
  a = ap.parse_args(argv)
  stats = convert(a.src, a.image_folder, a.dst_dir, a.shards, a.video_folder)
  print(json.dumps(stats))
  return 0


if __name__ == "__main__":
  sys.exit(main())
