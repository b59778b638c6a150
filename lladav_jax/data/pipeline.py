"""Grain input pipeline: LLaVA records -> static-shape host batches for the trainer.

    source (JSON/JSONL/YAML, ArrayRecord shards, TFDS) -> seeded shuffle -> repeat
      -> shard per JAX process -> map(parse, label, load+tile images, expand, truncate)
      -> [mp_prefetch workers] -> drop+count skipped samples -> static-shape batch

The trainer calls `build_train_iterator(...)` and passes each batch to
`jax.make_array_from_process_local_data`. A batch is a `batch.TrainBatch` of NumPy arrays (the one
layout, see lladav_jax/batch.py), B = per-process batch, L = bucket length, T = tile budget. Each
row is first padded with EOS up to the original's padded length (labels = EOS: the original pads
input_ids *and* labels with EOS before image expansion; those positions are valid), then with the
pad id (segment 0: padding). With `packing` (training only) a row holds several conversations (greedy
first-fit, `BatchIterator._next_packed`), one segment each, and no EOS padding.

Skipped samples (bad files, too long, ...) travel as small `Skipped` records through the workers
and are dropped and counted by reason in the main process (`iterator_stats(it)`); the counters
are part of the checkpointed iterator state. Once more than `max_skip_fraction` of the samples
seen (after `skip_check_min_samples`) were skipped, a DataError names the counts and sample ids.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any

import grain
import numpy as np
from PIL import Image

from lladav_jax import batch as batch_lib
from lladav_jax import multimodal
from lladav_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lladav_jax.data import arrayrecord, records, template, tfds_source
from lladav_jax.data.records import DataError, Skip

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the pipeline reads: the `data` section of the training config (configs/finetune.py)."""
  # .json / .jsonl / .yaml (LLaVA `datasets:` list) / {a,b}.json; an ArrayRecord file, glob or
  # directory (see data/arrayrecord.py); or "tfds:NAME[:SPLIT]" (see data/tfds_source.py).
  path: str = ""
  image_folder: str = ""  # "" = the working directory; no record's path leaves it (links resolved)
  video_folder: str = ""  # default: image_folder
  allow_absolute_paths: bool = False  # True: a record's absolute image / video path is opened where it points
  tfds_data_dir: str = ""
  format: str = "llava"  # "llava" (preprocess_llada) | "plain" (stage 1, llada_plain)
  seq_len: int = 8192  # model_max_length: truncation before and after image expansion
  buckets: tuple[int, ...] = ()  # sequence-length buckets (each <= seq_len); () = (seq_len,)
  # The most image tiles one sample may have (more -> skipped). A batch's pixels [B, T, S, S, 3] take the
  # smallest of `tile_buckets` that holds its largest sample: T varies by batch within a few compiled sizes.
  tile_budget: int = 16
  tile_buckets: tuple[int, ...] = ()  # () = batch.TILE_BUCKETS below tile_budget, then tile_budget itself
  # Rows that share one EOS padding length (consecutive rows of a process batch). The original collates
  # and EOS-pads each GPU's micro-batch on its own (per_device_train_batch_size: 16 in stage 1, 1 in
  # stages 2-3, so no padding there); the stage presets set it so. 0 = the whole process batch.
  pad_group_size: int = 0
  truncate: bool = True  # the original truncates over-long text; False skips every over-long sample
  # Sequence packing (training batches only): greedy first-fit of conversations into the batch's rows of
  # seq_len tokens and tile_budget tiles (the budget is then per row), one segment each; no EOS padding
  # (docs/FIDELITY.md). train.global_batch_size counts rows. Off = the original: one conversation a row.
  packing: bool = False
  max_skip_fraction: float = 0.01
  skip_check_min_samples: int = 200
  num_workers: int = 0  # grain mp_prefetch worker processes; 0 = in-process
  prefetch_buffer: int = 4  # per-worker buffer (elements)
  read_threads: int = 2  # threads per process that run the map step
  frames_upbound: int = 32
  video_fps: float = 1.0
  # The original's force_sample: always frames_upbound frames (a video file: even when it has fewer at
  # video_fps; a frame folder: instead of its fixed 10).
  force_sample: bool = False
  shuffle: bool = True
  drop_remainder: bool = True
  max_image_pixels: int = int(Image.MAX_IMAGE_PIXELS or 89478485)  # larger -> decompression_bomb
  allow_truncated_images: bool = False  # the original sets ImageFile.LOAD_TRUNCATED_IMAGES = True
  labels: template.LabelConfig = template.LabelConfig()

  def replace(self, **kw) -> "DataConfig":
    return dataclasses.replace(self, **kw)


def _buckets(cfg) -> list[int]:
  b = sorted(int(x) for x in (cfg.buckets or [cfg.seq_len]))
  if b[-1] != cfg.seq_len:
    b = sorted(set(b) | {int(cfg.seq_len)})
  if b[0] <= 0 or b[-1] > cfg.seq_len:
    raise ValueError(f"data.buckets {b} must be positive and <= data.seq_len={cfg.seq_len}")
  return b


def tile_buckets(cfg) -> list[int]:
  """The batch tile counts: data.tile_buckets (or batch.TILE_BUCKETS) up to data.tile_budget, which is the last."""
  given = [int(x) for x in (cfg.tile_buckets or batch_lib.TILE_BUCKETS)]
  if any(b <= 0 for b in given) or any(b > cfg.tile_budget for b in cfg.tile_buckets):
    raise ValueError(f"data.tile_buckets {list(cfg.tile_buckets)} must be positive and <= data.tile_budget="
                     f"{cfg.tile_budget}")
  return sorted({b for b in given if b < cfg.tile_budget} | {int(cfg.tile_budget)}) if cfg.tile_budget else [0]


def config_problems(cfg: DataConfig) -> list[str]:
  """Every bad field of `cfg` but an empty path, each named as in the training config."""
  errs = []
  if cfg.format not in ("llava", "plain"):
    errs.append(f"data.format={cfg.format!r} must be 'llava' or 'plain'")
  if cfg.seq_len <= 0 or cfg.tile_budget < 0:
    errs.append("data.seq_len must be > 0 and data.tile_budget >= 0")
  if cfg.force_sample and cfg.frames_upbound <= 0:
    errs.append("data.force_sample needs data.frames_upbound > 0 (the number of frames it samples)")
  if cfg.pad_group_size < 0:
    errs.append("data.pad_group_size must be >= 0")
  if not 0 <= cfg.max_skip_fraction <= 1:
    errs.append("data.max_skip_fraction must be in [0, 1]")
  if not isinstance(cfg.packing, bool):
    errs.append(f"data.packing={cfg.packing!r} must be true or false")
  if not isinstance(cfg.allow_absolute_paths, bool):
    errs.append(f"data.allow_absolute_paths={cfg.allow_absolute_paths!r} must be true or false")
  for check in (_buckets, tile_buckets):
    try:
      check(cfg)
    except ValueError as e:
      errs.append(str(e))
  return errs


def validate_config(cfg: DataConfig):
  errs = ([] if cfg.path else ["data.path is empty"]) + config_problems(cfg)
  if errs:
    raise ValueError("invalid data config:\n  " + "\n  ".join(errs))


# ----------------------------------------------------------------------------- sources

def make_source(cfg: DataConfig, seed: int = 0):
  """A random-access sequence of (key, raw record) for `cfg.path` (format auto-detected)."""
  p = cfg.path
  if p.startswith("tfds:"):
    parts = p[len("tfds:"):].split(":")
    return tfds_source.TfdsRecords(parts[0], data_dir=cfg.tfds_data_dir or None,
                                   split=parts[1] if len(parts) > 1 else "train")
  files = arrayrecord.find_shards(p)
  if files:
    return arrayrecord.ArrayRecordRecords(files)
  return records.json_source(p, seed)


# ----------------------------------------------------------------------------- per sample

@dataclasses.dataclass(frozen=True)
class Sample:
  """A usable conversation, expanded (image tokens in place) and truncated to data.seq_len."""
  expanded: multimodal.Expanded
  pre_len: int  # tokens before image expansion: the original EOS-pads each batch to its longest such length
  id: str  # the record's id and where it came from (logs, `BatchIterator.last_ids`)


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record that cannot be used. It goes through the workers like a sample (an exception would stop the
  pipeline) and is counted by `reason` (records.Skip's) in the main process."""
  reason: str
  id: str
  detail: str


class SampleProcessor:
  """(key, raw record) -> a Sample, or a Skipped naming why not."""

  def __init__(self, tokenizer, image_cfg: multimodal.ImageConfig, cfg: DataConfig):
    self.tok = tokenizer
    self.image_cfg = image_cfg
    self.cfg = cfg

  def __call__(self, elem):
    key, raw = elem
    rid = key
    try:
      rec = records.parse_record(raw)
      if rec.get("id") is not None:
        rid = f"{rec['id']} ({key})"
      return self.process(rec, rid)
    except Skip as e:
      return Skipped(e.reason, rid, e.detail[:300])

  # -- text
  def tokens_and_labels(self, rec: dict):
    c = self.cfg
    msgs = records.conversation(rec)
    kind, refs = records.media_refs(rec)
    if c.format == "plain":
      if kind == "text" or len(refs) != 1:
        raise Skip("image_tag_mismatch", f"a plain (stage-1) record needs exactly one image, has {len(refs)}")
      msgs = template.normalize_image_tags(msgs, c.labels)
      try:
        ids, labels = template.render_plain(self.tok, msgs, c.labels)
      except ValueError as e:
        raise Skip("bad_record", str(e)) from None
      return ids, labels, kind, refs
    if kind != "text":
      msgs = template.normalize_image_tags(msgs, c.labels)
    msgs = template.training_messages(msgs, c.labels)
    if not template.has_answer(msgs):
      raise Skip("no_answer", "no assistant turn")
    n_tags = sum(text.count(template.IMAGE_TAG) for _, text in msgs)
    if n_tags != len(refs):
      raise Skip("image_tag_mismatch", f"{n_tags} <image> tags but {len(refs)} {kind if refs else 'image'}s")
    ids, labels = template.render_training(self.tok, msgs, c.labels)
    return ids, labels, kind, refs

  # -- images
  def media_inputs(self, rec: dict, kind: str, refs: list) -> list[multimodal.ImageInput]:
    c = self.cfg
    if kind == "text":
      return []
    opener = records.Opener(rec, c.image_folder, c.video_folder or c.image_folder,
                            allow_absolute_paths=c.allow_absolute_paths)
    try:
      if kind == "video":
        frames = records.load_video_frames(opener, refs[0], video_fps=c.video_fps, frames_upbound=c.frames_upbound,
                                           force_sample=c.force_sample,
                                           max_pixels=c.max_image_pixels, allow_truncated=c.allow_truncated_images)
        return [multimodal.process_video(frames, self.image_cfg)]
      datas = [opener.data(r, "image") for r in refs]  # all present before decoding any
      imgs = [records.open_image(d, r, max_pixels=c.max_image_pixels, allow_truncated=c.allow_truncated_images)
              for d, r in zip(datas, refs)]
      return multimodal.process_sample_images(imgs, self.image_cfg)
    except (OSError, ValueError) as e:  # decoding that failed past PIL's header check
      raise Skip(f"corrupt_{kind}", f"{refs}: {type(e).__name__}: {e}") from None

  def process(self, rec: dict, rid: str) -> Sample:
    c = self.cfg
    ids, labels, kind, refs = self.tokens_and_labels(rec)
    n_media = len(refs)
    if len(ids) > c.seq_len:  # the collator's truncation, before image expansion
      if not c.truncate:
        raise Skip("too_long", f"{len(ids)} tokens before image expansion > seq_len {c.seq_len}")
      ids, labels = ids[:c.seq_len], labels[:c.seq_len]
      if sum(1 for t in ids if t == IMAGE_TOKEN_INDEX) < n_media:
        raise Skip("too_long", "truncation to seq_len cuts an image placeholder")
    pre_len = len(ids)
    inputs = self.media_inputs(rec, kind, refs)
    n_tiles = sum(x.num_tiles for x in inputs)
    if n_tiles > c.tile_budget:
      raise Skip("too_many_tiles", f"{n_tiles} tiles > tile_budget {c.tile_budget}")
    exp = multimodal.expand(ids, inputs, self.image_cfg, labels=labels)
    if len(exp.tokens) > c.seq_len:  # the original's second truncation, after expansion
      img = np.nonzero(exp.tokens == IMAGE_TOKEN_INDEX)[0]
      if not c.truncate or (img.size and img[-1] >= c.seq_len):
        raise Skip("too_long", f"{len(exp.tokens)} tokens after image expansion > seq_len {c.seq_len}")
      exp = batch_lib.truncate(exp, c.seq_len)
    if not (exp.labels != IGNORE_INDEX).any():
      raise Skip("no_labels", "no labelled token left after truncation")
    return Sample(exp, pre_len, rid)


# ----------------------------------------------------------------------------- batching

@dataclasses.dataclass(frozen=True)
class Batching:
  """What batching reads: the DataConfig and what is not in it (the rows of a process batch, the image
  geometry, the tokenizer's ids, and whether these are training batches: only those are packed)."""
  data: DataConfig
  batch_size: int
  image_cfg: multimodal.ImageConfig
  pad_id: int
  eos_id: int
  train: bool = True

  @property
  def packing(self) -> bool:
    return bool(self.data.packing) and self.train

  @property
  def buckets(self) -> list[int]:
    return _buckets(self.data)


def collate(rows: list, spec: Batching) -> batch_lib.TrainBatch:
  """Samples -> one static-shape batch (missing rows: all padding, no labels, segment 0 throughout).
  Packing: `rows` holds a list of samples a row, laid out as they are (no EOS padding)."""
  c = spec.data
  if spec.packing:
    packs = [[s.expanded for s in row] for row in rows]
    need = max([sum(len(e.tokens) for e in p) for p in packs], default=1)
    length = next(x for x in spec.buckets if x >= need)
    tiles = _tile_bucket(c, [sum(e.pixels.shape[0] for e in p) for p in packs])
    return batch_lib.collate_train(packs, spec.image_cfg, rows=spec.batch_size, length=length, tiles=tiles,
                                   pad_id=spec.pad_id)
  pre = [s.pre_len for s in rows]
  # The original pads input_ids and labels with EOS to the longest *pre-expansion* sample of its
  # (per-device) batch, then expands images and truncates to model_max_length.
  g = c.pad_group_size or spec.batch_size
  group_max = [max(pre[j - j % g:j - j % g + g]) for j in range(len(pre))]
  label = spec.eos_id if c.labels.label_eos_padding else IGNORE_INDEX
  samples = []
  for s, m in zip(rows, group_max):
    e = s.expanded
    n = min(m - s.pre_len, c.seq_len - len(e.tokens)) if c.labels.pad_with_eos else 0
    samples.append(batch_lib.extend(e, n, spec.eos_id, label, spec.image_cfg.tokens_per_tile))
  need = max([len(e.tokens) for e in samples], default=1)
  length = next(x for x in spec.buckets if x >= need)
  tiles = _tile_bucket(c, [e.pixels.shape[0] for e in samples])
  return batch_lib.collate_train(samples, spec.image_cfg, rows=spec.batch_size, length=length, tiles=tiles,
                                 pad_id=spec.pad_id)


def _tile_bucket(cfg: DataConfig, row_tiles: list) -> int:
  """The smallest tile bucket holding the batch's fullest row; a text-only batch takes the smallest too
  (one compiled shape fewer than a tile-less batch)."""
  need = max(row_tiles + [1])
  return next(t for t in tile_buckets(cfg) if t >= need) if cfg.tile_budget else 0


class _BatchDataset(grain.IterDataset):
  def __init__(self, parent, spec: Batching, *, num_batches: int | None):
    super().__init__(parent)
    self.spec = spec
    self.num_batches = num_batches

  def __iter__(self):
    return BatchIterator(self._parent.__iter__(), self.spec, num_batches=self.num_batches)

  def __str__(self):
    return f"LLaVABatch(batch_size={self.spec.batch_size}, buckets={list(self.spec.buckets)})"


class BatchIterator(grain.DatasetIterator):
  """Drops and counts Skipped records, enforces data.max_skip_fraction, collates static batches.

  `num_batches` (eval): exactly this many batches, the last ones filled with padding rows
  (labels all -100, segments all 0) so every process yields the same number of batches.
  `log_first`: how many skips of each reason are logged.
  """
  MAX_IDS = 8

  def __init__(self, parent, spec: Batching, *, num_batches: int | None = None, log_first: int = 3):
    super().__init__(parent)
    self.spec = spec
    self.max_skip_fraction = float(spec.data.max_skip_fraction)
    self.min_samples = int(spec.data.skip_check_min_samples)
    self.drop_remainder = bool(spec.data.drop_remainder)
    self.num_batches = num_batches
    self.log_first = log_first
    self._seen = 0
    self._batches = 0
    self._skipped: dict[str, int] = collections.Counter()
    self._ids: dict[str, list] = collections.defaultdict(list)
    self._exhausted = False
    # packing: the sample that fitted no row of the last batch opens the next one; the state is taken from
    # before it was read, so a restore reads it again
    self._pending: Sample | None = None
    self._pending_state: dict | None = None
    self.last_ids: list[str] = []  # record ids of the rows of the last batch (debugging, tests)

  def _count_skip(self, el: Skipped):
    reason = el.reason
    self._skipped[reason] += 1
    if len(self._ids[reason]) < self.MAX_IDS:
      self._ids[reason].append(str(el.id))
    if self._skipped[reason] <= self.log_first:
      log.warning("skipped sample %s (%s): %s", el.id, reason, el.detail)
    skipped = sum(self._skipped.values())
    if self._seen >= self.min_samples and skipped > self.max_skip_fraction * self._seen:
      raise DataError(
          f"{skipped} of {self._seen} samples ({skipped / self._seen:.1%}) were skipped, more than "
          f"data.max_skip_fraction={self.max_skip_fraction}. By reason: {dict(self._skipped)}. "
          f"Sample ids (the first {self.MAX_IDS} of each reason): {dict(self._ids)}. Fix or remove these records, "
          f"or raise data.max_skip_fraction if losing them is acceptable")

  def _next_good(self):
    """(the next sample that is no skip, the parent's state from before it was read), skips counted and
    checked against the limit on the way; (None, None) once the source is exhausted. The state is taken
    only when packing (a held sample must be read again after a restore); unpacked batches need none."""
    while not self._exhausted:
      before = self._parent.get_state() if self.spec.packing else None
      try:
        el = next(self._parent)
      except StopIteration:
        self._exhausted = True
        break
      self._seen += 1
      if isinstance(el, Skipped):
        self._count_skip(el)
        continue
      return el, before
    return None, None

  def _next_packed(self):
    """Greedy first-fit: each sample goes into the first row with room for its tokens and tiles; the first
    sample that fits no row closes the batch (and opens the next)."""
    spec = self.spec
    rows = [[] for _ in range(spec.batch_size)]
    free = np.full((spec.batch_size, 2), (spec.data.seq_len, spec.data.tile_budget))
    el, before = self._pending, self._pending_state
    self._pending = None
    while True:
      if el is None:
        el, before = self._next_good()
        if el is None:
          break
      need = (len(el.expanded.tokens), el.expanded.pixels.shape[0])
      fits = np.nonzero((free >= need).all(axis=1))[0]
      if not fits.size:
        self._pending, self._pending_state = el, before
        break
      rows[fits[0]].append(el)
      free[fits[0]] -= need
      el = None
    used = [r for r in rows if r]
    if not used or (len(used) < spec.batch_size and self.drop_remainder and self._pending is None):
      raise StopIteration  # the tail of a finite source, as unpacked
    self._batches += 1
    self.last_ids = [s.id for row in rows for s in row]
    return collate(rows, spec)

  def __next__(self):
    self._assert_not_closed()
    if self.num_batches is not None and self._batches >= self.num_batches:
      raise StopIteration
    if self.spec.packing:
      return self._next_packed()
    rows = []
    while len(rows) < self.spec.batch_size:
      el, _ = self._next_good()
      if el is None:
        break
      rows.append(el)
    if len(rows) < self.spec.batch_size and self.num_batches is None:
      if not rows or self.drop_remainder:
        raise StopIteration
    self._batches += 1
    self.last_ids = [s.id for s in rows]
    return collate(rows, self.spec)

  def get_state(self) -> dict[str, Any]:
    if self._pending is not None:  # read again after a restore: counted once (a pending sample is no skip)
      return {"parent": self._pending_state, "seen": self._seen - 1, "batches": self._batches, "exhausted": False,
              "skipped": dict(self._skipped), "skipped_ids": {k: list(v) for k, v in self._ids.items()}}
    return {"parent": self._parent.get_state(), "seen": self._seen, "batches": self._batches,
            "exhausted": self._exhausted, "skipped": dict(self._skipped),
            "skipped_ids": {k: list(v) for k, v in self._ids.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._seen = int(state["seen"])
    self._batches = int(state["batches"])
    self._exhausted = bool(state.get("exhausted", False))
    self._pending = self._pending_state = None
    self._skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})
    self._ids = collections.defaultdict(list, {k: list(v) for k, v in state["skipped_ids"].items()})

  def stats(self) -> dict[str, Any]:
    skipped = sum(self._skipped.values())
    return {"seen": self._seen, "used": self._seen - skipped, "skipped": skipped,
            "skip_fraction": skipped / self._seen if self._seen else 0.0, "by_reason": dict(self._skipped),
            "skipped_ids": {k: list(v) for k, v in self._ids.items()}, "batches": self._batches}

  def __str__(self):
    return "LLaVABatchIterator"


def iterator_stats(it) -> dict[str, Any]:
  """seen / used / skipped samples, skips by reason with a few sample ids, batches produced."""
  return it.stats()


# ----------------------------------------------------------------------------- entry points

def _build(data_cfg, tokenizer, image_cfg, *, batch_size_per_process, process_index, process_count, seed,
           train: bool):
  validate_config(data_cfg)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  source = make_source(data_cfg, seed)
  if len(source) == 0:
    raise DataError(f"no records in {data_cfg.path}")
  ds = grain.MapDataset.source(source)
  if data_cfg.shuffle:
    ds = ds.shuffle(seed=seed)
  if train:
    ds = ds.repeat()  # a new permutation every epoch
  ds = ds[process_index::process_count]
  ds = ds.map(SampleProcessor(tokenizer, image_cfg, data_cfg))
  read = grain.ReadOptions(num_threads=max(1, int(data_cfg.read_threads)),
                           prefetch_buffer_size=max(1, int(data_cfg.prefetch_buffer)))
  it = ds.to_iter_dataset(read)
  if data_cfg.num_workers > 0:
    from absl import flags  # grain's multiprocessing reads absl flags; scripts/tests may not parse them
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_cfg.num_workers),
                                                     per_worker_buffer_size=max(1, int(data_cfg.prefetch_buffer))))
  num_batches = None
  if not train:
    per_proc = math.ceil(len(source) / process_count) if not data_cfg.drop_remainder else len(source) // process_count
    num_batches = (math.ceil(per_proc / batch_size_per_process) if not data_cfg.drop_remainder
                   else per_proc // batch_size_per_process)
  spec = Batching(data_cfg, batch_size=int(batch_size_per_process), image_cfg=image_cfg, pad_id=tokenizer.pad_id,
                  eos_id=tokenizer.eos_id, train=train)
  return iter(_BatchDataset(it, spec, num_batches=num_batches))


def build_train_iterator(data_cfg: DataConfig, tokenizer, image_cfg: multimodal.ImageConfig, *,
                         batch_size_per_process: int, process_index: int, process_count: int, seed: int):
  """Infinite, checkpointable (get_state/set_state) iterator of static-shape host batches (packed with
  `data_cfg.packing`)."""
  return _build(data_cfg, tokenizer, image_cfg, batch_size_per_process=batch_size_per_process,
                process_index=process_index, process_count=process_count, seed=seed, train=True)


def build_eval_iterator(data_cfg: DataConfig, tokenizer, image_cfg: multimodal.ImageConfig, *,
                        batch_size_per_process: int, process_index: int, process_count: int, seed: int = 0):
  """One pass, no repeat, never packed; every process yields the same number of batches. With
  drop_remainder=False the last batches carry padding rows (labels all -100, segments all 0):
  weight rows by whether they have labels."""
  return _build(data_cfg, tokenizer, image_cfg, batch_size_per_process=batch_size_per_process,
                process_index=process_index, process_count=process_count, seed=seed, train=False)
