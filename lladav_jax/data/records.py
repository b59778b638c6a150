"""LLaVA-format records: reading data files, parsing records, loading images and videos.

A *source* is a random-access sequence of `(key, raw)` where raw is JSON bytes (JSON / JSONL /
ArrayRecord) or an already-decoded dict (TFDS); `key` names the record for skip reports
(`file:line` or `file#index`). Records are parsed lazily in the pipeline's map step, so a
malformed line is skipped and counted like any other bad sample.

Record fields (the original's `LazySupervisedDataset`): `id`; `conversations`: a list of
`{"from": "human"|"gpt"|..., "value": str}` or `{"role", "content"}`; `image`: a path or a list
of paths (relative to image_folder); `video`: a file (animated GIF/WebP/PNG through PIL; mp4, webm etc. through
PyAV, a dependency) or a list of frame files or a directory of frames; neither: text only. A path that resolves
(`..` and symbolic links followed) outside its folder is never opened: skip reason `outside_image_folder` /
`outside_video_folder`; absolute paths only with `allow_absolute_paths`.
Embedded bytes (ArrayRecord shards) live in `_blobs` {path: base64}; decoded arrays (TFDS) in
`_arrays` {path: uint8 HWC array}.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageSequence, UnidentifiedImageError

from lladav_jax.data import json_index


class Skip(Exception):
  """A sample that cannot be used as it is; `reason` is a short stable name for counters."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


class DataError(RuntimeError):
  """Raised when too many samples are skipped (or data files cannot be read at all)."""


# ----------------------------------------------------------------------------- sources

def _indexed(path: str):
  """(index, record count) of one .json list / .jsonl file (json_index: built once, then cached)."""
  if not os.path.isfile(path):
    raise DataError(f"data file not found: {path}")
  try:
    return json_index.load_index(path)
  except json_index.JsonIndexError as e:
    raise DataError(f"{path}: {e}; use .jsonl for line-per-record files") from None


def _selection(path: str, n: int, strategy: str, rng: np.random.Generator, where: str):
  """LLaVA's YAML `sampling_strategy`: all | first:N | end:N | random:N, N may be P%.
  -> None (all), a (lo, hi) range, or the chosen record numbers (random)."""
  if strategy == "all" or not strategy:
    return None
  if ":" not in strategy:
    raise DataError(f"{where}: unknown sampling_strategy {strategy!r}")
  kind, num = strategy.split(":", 1)
  k = math.ceil(int(num[:-1]) * n / 100) if num.endswith("%") else int(num)
  if kind == "first":
    return 0, min(k, n)
  if kind == "end":
    return max(0, n - k), n
  if kind == "random":  # the original shuffles unseeded; here seeded
    return json_index.cached_picks(path, strategy, rng, lambda: rng.permutation(n)[:k])
  raise DataError(f"{where}: unknown sampling_strategy {strategy!r}")


def json_source(data_path: str, seed: int = 0) -> json_index.IndexedJsonSource:
  """A file (.json list or .jsonl), a `{a,b}.json` set, or a YAML list of datasets. Records are read
  from the files on access (json_index): workers get paths and indexes, never the records."""
  if data_path.endswith((".yaml", ".yml")):
    import yaml
    with open(data_path) as f:
      spec = yaml.safe_load(f)
    if not isinstance(spec, dict) or not isinstance(spec.get("datasets"), list):
      raise DataError(f"{data_path}: expected `datasets: [{{json_path: ..., sampling_strategy: ...}}]`")
    rng = np.random.default_rng(seed)
    base = os.path.dirname(os.path.abspath(data_path))
    parts = []
    for d in spec["datasets"]:
      p = d.get("json_path")
      if not p:
        raise DataError(f"{data_path}: a dataset entry has no json_path: {d}")
      p = p if os.path.isabs(p) else os.path.join(base, p)
      index, n = _indexed(p)
      parts.append((p, index, _selection(p, n, str(d.get("sampling_strategy", "all")), rng, data_path)))
    return json_index.IndexedJsonSource(parts)
  m = re.match(r"^(.*)\{(.*)\}\.json$", data_path)
  paths = [f"{m.group(1)}{name}.json" for name in m.group(2).split(",")] if m else [data_path]
  return json_index.IndexedJsonSource([(p, _indexed(p)[0], None) for p in paths])


# ----------------------------------------------------------------------------- records

def parse_record(raw) -> dict:
  if isinstance(raw, dict):
    return raw
  try:
    rec = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise Skip("malformed_json", str(e)[:100]) from None
  if not isinstance(rec, dict):
    raise Skip("malformed_json", f"a record must be a JSON object, got {type(rec).__name__}")
  return rec


def conversation(rec: dict) -> list[tuple[str, str]]:
  """(role, content) pairs; `from`/`value` or `role`/`content`. Raises Skip('bad_record')."""
  conv = rec.get("conversations", rec.get("messages"))
  if not isinstance(conv, list) or not conv:
    raise Skip("bad_record", "no conversations")
  out = []
  for m in conv:
    if not isinstance(m, dict):
      raise Skip("bad_record", "a turn is not an object")
    role = m.get("role", m.get("from"))
    content = m.get("content", m.get("value"))
    if not isinstance(role, str) or not isinstance(content, str):
      raise Skip("bad_record", "a turn lacks a string role/from or content/value")
    out.append((role, content))
  return out


def media_refs(rec: dict) -> tuple[str, list]:
  """('image', [paths]) | ('video', [ref]) | ('text', [])  (image wins over video, as the original)."""
  if rec.get("image") is not None:
    im = rec["image"]
    ims = im if isinstance(im, list) else [im]
    if not all(isinstance(x, str) for x in ims):
      raise Skip("bad_record", "image must be a path or a list of paths")
    return ("image", ims) if ims else ("text", [])
  if rec.get("video") is not None:
    v = rec["video"]
    if not (isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))):
      raise Skip("bad_record", "video must be a path or a list of frame paths")
    return "video", [v]
  return "text", []


# ----------------------------------------------------------------------------- images

class Opener:
  """Reads a referenced file from the record's embedded blobs/arrays or from disk, never outside its folder.

  A reference is joined to its folder (image_folder; video_folder, default image_folder; "" = the working
  directory) and resolved with every symbolic link; a file whose real path is not inside the folder's real
  path is Skip(outside_<kind>_folder) before anything opens it. `allow_absolute_paths`: an absolute
  reference is opened where it points (data the user trusts, written with absolute paths)."""

  def __init__(self, rec: dict, image_folder: str | None, video_folder: str | None = None, *,
               allow_absolute_paths: bool = False):
    self.blobs = rec.get("_blobs") or {}
    self.arrays = rec.get("_arrays") or {}
    self.folders = {"image": image_folder or "", "video": video_folder or image_folder or ""}
    self.allow_absolute_paths = allow_absolute_paths

  def path(self, ref: str, kind: str = "image") -> str:
    """The real path of the file `ref` names (symbolic links resolved): the one `open` reads."""
    if self.allow_absolute_paths and os.path.isabs(ref):
      return os.path.realpath(ref)
    root = os.path.realpath(self.folders[kind] or os.curdir)
    real = os.path.realpath(os.path.join(root, ref))
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
      hint = " (an absolute path: data.allow_absolute_paths=True opens those)" if os.path.isabs(ref) else ""
      raise Skip(f"outside_{kind}_folder", f"{ref}{hint} resolves to {real}, outside the {kind} folder {root}")
    return real

  def open(self, ref: str, kind: str = "image") -> BinaryIO:
    """A binary file object of the referenced file (an embedded blob, or the file on disk: videos are
    decoded from the file, not from a copy in memory). Raises Skip(missing_*/zero_size_*/outside_*_folder)."""
    if ref in self.blobs:
      b = self.blobs[ref]
      data = base64.b64decode(b) if isinstance(b, str) else bytes(b)
      if not data:
        raise Skip(f"zero_size_{kind}", f"{ref} is an empty file")
      return io.BytesIO(data)
    p = self.path(ref, kind)
    if not os.path.isfile(p):
      raise Skip(f"missing_{kind}", ref)
    if os.path.getsize(p) == 0:
      raise Skip(f"zero_size_{kind}", f"{ref} is an empty file")
    return open(p, "rb")

  def data(self, ref: str, kind: str = "image"):
    """bytes, or an ndarray (decoded TFDS image). Raises Skip as `open`."""
    if ref in self.arrays:
      return self.arrays[ref]
    with self.open(ref, kind) as f:
      return f.read()


def open_image(data, ref: str, *, max_pixels: int, allow_truncated: bool = False) -> Image.Image:
  """Decodes one image fully (mode as stored; multimodal.to_rgb converts it later).

  Skip reasons: zero_size_image, decompression_bomb (over `max_pixels`, or PIL's own limit),
  corrupt_image (unreadable / truncated unless allow_truncated, as the original's
  ImageFile.LOAD_TRUNCATED_IMAGES = True would load it).
  """
  if isinstance(data, np.ndarray):
    if data.size == 0:
      raise Skip("zero_size_image", f"{ref}: array of shape {data.shape}")
    if data.ndim == 3 and data.shape[-1] == 1:
      data = data[..., 0]
    return Image.fromarray(np.ascontiguousarray(data))
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      w, h = img.size
      if w <= 0 or h <= 0:
        raise Skip("zero_size_image", f"{ref}: {w}x{h}")
      if w * h > max_pixels:
        raise Skip("decompression_bomb", f"{ref}: {w}x{h} = {w * h} px > {max_pixels}")
      old = ImageFile.LOAD_TRUNCATED_IMAGES
      ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
      try:
        img.load()
      finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
  except Skip:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise Skip("decompression_bomb", f"{ref}: {e}") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
    raise Skip("corrupt_image", f"{ref}: {type(e).__name__}: {e}") from None
  if img.width <= 0 or img.height <= 0:
    raise Skip("zero_size_image", f"{ref}: {img.size}")
  return img


# ----------------------------------------------------------------------------- video

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".wmv", ".flv", ".mpeg", ".mpg", ".m4v")
ANIMATED_EXTS = (".gif", ".webp", ".png", ".apng")  # decoded frame by frame with PIL


def sample_frame_indices(total: int, fps: float, *, video_fps: float = 1.0, frames_upbound: int = 32,
                         force_sample: bool = False) -> tuple[list[int], list[float]]:
  """The original's process_video_with_decord: one frame every round(fps / video_fps) frames; if more than
  `frames_upbound` (or `force_sample`), `frames_upbound` spaced uniformly over the whole video. Returns the
  indices and the frame times it keeps (i / step before the resampling, i / fps after, as the original
  writes them). Where round(fps / video_fps) is 0 (fps below half of video_fps) the original crashes on
  range(..., 0); every frame is taken instead."""
  if total <= 0:
    return [], []
  step = max(1, round(fps / video_fps)) if fps and fps > 0 else 1
  idx = list(range(0, total, step))
  times = [i / step for i in idx]
  if frames_upbound > 0 and (len(idx) > frames_upbound or force_sample):
    idx = np.linspace(0, total - 1, frames_upbound, dtype=int).tolist()
    times = [i / fps for i in idx] if fps and fps > 0 else [float(i) for i in idx]
  return idx, times


FOLDER_FRAMES = 10  # the original's train.py: "Hard CODE ... uniformly sampling 10 frames" of a frame folder


def folder_frame_indices(n: int, frames_upbound: int, force_sample: bool = False) -> list[int]:
  """A folder of frames (ShareGPTVideo-style) as the original's train.py samples it: linspace(0, n - 1, k)
  with k = 10, or frames_upbound with force_sample; fewer than k frames repeat."""
  k = frames_upbound if force_sample else FOLDER_FRAMES
  return np.linspace(0, n - 1, k, dtype=int).tolist() if n > 0 and k > 0 else []


def _animated_frames(f: BinaryIO, ref: str, pick, max_pixels: int):
  try:
    img = Image.open(f)
    if img.width * img.height > max_pixels:
      raise Skip("decompression_bomb", f"{ref}: {img.size}")
    durations, frames = [], []
    for fr in ImageSequence.Iterator(img):
      durations.append(fr.info.get("duration", 100) or 100)
      frames.append(fr.convert("RGB"))
  except Skip:
    raise
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
    raise Skip("corrupt_video", f"{ref}: {type(e).__name__}: {e}") from None
  fps = 1000.0 / (sum(durations) / len(durations)) if frames else 0
  return [frames[i] for i in pick(len(frames), fps)]


def _decoded_video_frames(f: BinaryIO, ref: str, pick, max_pixels: int):
  """mp4 & co. through PyAV (FFmpeg): the frame count from the container (else one demux pass, no decoding),
  the stream's average frame rate (decord's get_avg_fps), then one decoding pass in presentation order up to
  the last chosen index that converts only the chosen frames to RGB."""
  try:
    import av
  except ImportError:
    raise ImportError(f"decoding {ref} needs PyAV, a dependency of lladav-jax: pip install -r requirements.txt "
                      "(or pip install av)") from None
  try:
    with av.open(f) as c:
      if not c.streams.video:
        raise Skip("corrupt_video", f"{ref}: no video stream")
      s = c.streams.video[0]
      w, h = s.codec_context.width, s.codec_context.height
      if w * h > max_pixels:
        raise Skip("decompression_bomb", f"{ref}: {w}x{h} = {w * h} px a frame > {max_pixels}")
      total, fps = s.frames, float(s.average_rate or 0)
      if not total:
        total = sum(1 for p in c.demux(s) if p.size)
        c.seek(0, stream=s)
      idx = pick(total, fps)
      if not idx:
        raise Skip("corrupt_video", f"{ref}: no frames")
      s.thread_type = "AUTO"
      want, last, got = set(idx), max(idx), {}
      for i, frame in enumerate(c.decode(s)):
        if i in want:
          got[i] = frame.to_image()
        if i >= last:
          break
  except Skip:
    raise
  except (av.FFmpegError, OSError, ValueError, IndexError) as e:
    raise Skip("corrupt_video", f"{ref}: {type(e).__name__}: {e}") from None
  if len(got) < len(want):
    raise Skip("corrupt_video", f"{ref}: {len(want) - len(got)} of {len(want)} chosen frames could not be decoded "
                                f"(the container counts {total}; truncated?)")
  return [got[i] for i in idx]


def decode_video(f: BinaryIO, ref: str, pick, *, max_pixels: int) -> list[Image.Image]:
  """A video file -> the frames `pick(total, fps) -> indices` chooses: animated GIF / WebP / PNG through
  PIL, mp4 & co. (VIDEO_EXTS) through PyAV. `f` is a binary file object. Raises Skip (reason, `ref`)."""
  low = ref.lower()
  if low.endswith(ANIMATED_EXTS):
    frames = _animated_frames(f, ref, pick, max_pixels)
  elif low.endswith(VIDEO_EXTS):
    frames = _decoded_video_frames(f, ref, pick, max_pixels)
  else:
    raise Skip("corrupt_video", f"{ref}: unknown video type")
  if not frames:
    raise Skip("corrupt_video", f"{ref}: no frames")
  return frames


def load_video_frames(opener: Opener, ref, *, video_fps: float, frames_upbound: int, max_pixels: int,
                      allow_truncated: bool = False, force_sample: bool = False) -> list[Image.Image]:
  """A video file (sample_frame_indices), or a folder of frame files / a list of them (folder_frame_indices:
  every regular file of the folder, sorted by name, as the original). A frame that cannot be decoded is
  left out, as the original does; none left is Skip(corrupt_video)."""
  if isinstance(ref, list):  # a folder's frames, named one by one
    files = ref
  elif ref not in opener.blobs and os.path.isdir(opener.path(ref, "video")):
    d = opener.path(ref, "video")
    # references like the record's (each frame is checked against the folder again: a link out is refused)
    files = sorted(os.path.join(ref, f) for f in os.listdir(d) if os.path.isfile(os.path.join(d, f)))
  else:
    def pick(total, fps):
      return sample_frame_indices(total, fps, video_fps=video_fps, frames_upbound=frames_upbound,
                                  force_sample=force_sample)[0]
    with opener.open(ref, "video") as f:
      return decode_video(f, ref, pick, max_pixels=max_pixels)
  if not files:
    raise Skip("missing_video", f"{ref}: no frames")
  frames = []
  for i in folder_frame_indices(len(files), frames_upbound, force_sample):
    data = opener.data(files[i], "video")  # missing or outside the folder: the sample is skipped
    try:
      frames.append(open_image(data, files[i], max_pixels=max_pixels, allow_truncated=allow_truncated))
    except Skip as e:
      if e.reason != "corrupt_image":
        raise
  if not frames:
    raise Skip("corrupt_video", f"{ref}: no frame could be decoded")
  return frames
