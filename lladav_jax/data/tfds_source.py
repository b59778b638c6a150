"""Prepared TFDS datasets as pipeline sources, read with `tfds.data_source` (no TensorFlow).

Expected features per example (what `prepare_tfds` writes; array_record file format):
  json:   Text   - one LLaVA record (conversations, id, image/video references)
  images: Sequence(Tensor(shape=(), dtype=object)) - the encoded bytes of the record's image
          references in order (image list, or the video file / frame files); optional.
Decoded images (uint8 HWC arrays, e.g. from a tfds.features.Image) are accepted too.

    data.path = "tfds:NAME[:SPLIT]", data.tfds_data_dir = DIR
"""
from __future__ import annotations

import base64
import json

import numpy as np

from lladav_jax.data import arrayrecord, records


def example_to_record(ex: dict) -> dict | bytes:
  """A TFDS example -> a record dict with `_blobs` / `_arrays` (or raw bytes if not parseable)."""
  raw = ex.get("json", ex.get("record"))
  if isinstance(raw, np.ndarray):
    raw = raw.item()
  if isinstance(raw, str):
    raw = raw.encode()
  try:
    rec = json.loads(raw)
  except (TypeError, ValueError, UnicodeDecodeError):
    return raw if isinstance(raw, bytes) else b""  # -> malformed_json downstream
  if not isinstance(rec, dict):
    return raw
  images = ex.get("images")
  if images is None or len(images) == 0:
    return rec
  if rec.get("image") is not None:
    refs = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
  elif rec.get("video") is not None:
    refs = rec["video"] if isinstance(rec["video"], list) else [rec["video"]]
  else:
    refs = [f"tfds_image_{k}" for k in range(len(images))]
    rec["image"] = refs if len(refs) > 1 else refs[0]
  blobs, arrays = {}, {}
  for ref, im in zip(refs, images):
    if not isinstance(ref, str):
      continue
    if isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim >= 2:
      arrays[ref] = im
    else:
      b = im.item() if isinstance(im, np.ndarray) else im
      blobs[ref] = bytes(b)
  if blobs:
    rec["_blobs"] = blobs
  if arrays:
    rec["_arrays"] = arrays
  return rec


class TfdsRecords:
  """(key, record) from `tfds.data_source(name, data_dir=, split=)`; opened lazily per process."""

  def __init__(self, name: str, data_dir: str | None = None, split: str = "train", data_source=None):
    self.name, self.data_dir, self.split = name, data_dir, split
    self._ds = data_source
    self._len = len(self._open())

  def _open(self):
    if self._ds is None:
      import tensorflow_datasets as tfds
      self._ds = tfds.data_source(self.name, data_dir=self.data_dir, split=self.split)
    return self._ds

  def __len__(self):
    return self._len

  def __getitem__(self, i: int):
    return f"{self.name}/{self.split}#{int(i)}", example_to_record(self._open()[int(i)])

  def __getstate__(self):
    d = dict(self.__dict__)
    if not isinstance(d["_ds"], (list, tuple)):  # real tfds sources reopen in each worker
      d["_ds"] = None
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)

  def __repr__(self):
    return f"TfdsRecords({self.name!r}, split={self.split!r}, {self._len} records)"


def prepare_tfds(name: str, data_dir: str, splits: dict[str, str], image_folder: str,
                 video_folder: str | None = None) -> None:
  """Writes LLaVA JSON files as a TFDS dataset `name` (array_record format, no TensorFlow needed).

  splits: {split name: .json/.jsonl path}. Missing files are left out (the pipeline skips those
  samples as missing_image); malformed lines are kept as they are.
  """
  import tensorflow_datasets as tfds

  def examples(path):
    src = records.json_source(path)
    for i in range(len(src)):
      _, raw = src[i]
      imgs = []
      try:
        rec = json.loads(raw)
        rec, _ = arrayrecord.embed(rec, image_folder, video_folder) if isinstance(rec, dict) else (rec, 0)
        if isinstance(rec, dict):
          blobs = rec.pop("_blobs", {})
          refs = [r for r, _ in arrayrecord._refs(rec)]  # pylint: disable=protected-access
          if all(r in blobs for r in refs):
            imgs = [base64.b64decode(blobs[r]) for r in refs]
          elif blobs:  # keep the embedded subset in the JSON itself
            rec["_blobs"] = blobs
        raw = json.dumps(rec, ensure_ascii=False)
      except ValueError:
        raw = raw.decode("utf-8", "replace")
      yield i, {"json": raw, "images": imgs}

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "json": tfds.features.Text(),
          "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(p) for s, p in splits.items()}

    def _generate_examples(self, path):
      return examples(path)

  _Builder.name = name
  # A one-part module name keeps tfds from looking for checksum files next to this package
  # (that lookup needs `importlib_resources`, which is not a dependency).
  _Builder.__module__ = "lladav_tfds_builder"
  _Builder(data_dir=data_dir, file_format="array_record").download_and_prepare()
