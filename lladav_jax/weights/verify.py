"""Matching a checkpoint against a model config, with one error that names every offender.

An HF directory gets a `Plan`: which tensor(s) feed each parameter, the extras, and the groups
(vision / projector / image_newline) that come from init because the checkpoint has none of their
tensors (an original LLaDA or plain LLaMA directory; an error with `strict=True`). Any
other unexpected key, a missing key or a mis-shaped tensor fails with one `CheckpointMismatchError`
that lists every such key with the expected shape; a converted Orbax directory is checked the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import ml_dtypes
import numpy as np

from lladav_jax.config import ModelConfig
from lladav_jax.model import abstract_model
from lladav_jax.weights.hf_read import SafetensorsDir
from lladav_jax.weights.names import (ENTRIES, GROUPS, INDEX_FILE, VISION_PREFIX as _V, Entry, check_table_covers,
                                      beyond_config, flat_params, hf_shape, is_extra)


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors do not match the model config; `problems` lists every offender."""

  def __init__(self, path: str, problems: list[str]):
    self.problems = problems
    super().__init__(f"checkpoint {path} does not match the model config ({len(problems)} problem(s)):\n  "
                     + "\n  ".join(problems))


def fmt(shape) -> str:
  return "[" + ", ".join(str(int(d)) for d in shape) + "]"


@dataclasses.dataclass
class ParamSource:
  entry: Entry
  shape: tuple[int, ...]  # our full shape (layers first when stacked)
  names: list[str]  # HF names, one per layer (or one)

  @property
  def layer_shape(self):
    return self.shape[1:] if self.entry.stacked else self.shape


@dataclasses.dataclass
class Plan:
  """What an HF directory provides for a model config: every parameter's sources, the extras, and the
  groups (vision / projector / image_newline) that must come from init."""
  path: str
  scheme: str  # "llada_v" (LLaMA names) or "llada" (model.transformer.*)
  params: dict[str, ParamSource]  # only the parameters read from the checkpoint, in model order
  initialized: list[str]  # parameters taken from init (whole groups absent from the checkpoint)
  extras: list[str]
  files: SafetensorsDir


def plan_hf(path: str, cfg: ModelConfig, *, strict: bool = False, files=None) -> Plan:
  """Matches an HF directory (or `files`: its tensors, e.g. `assemble.AssembledTensors`) against `cfg`;
  raises CheckpointMismatchError listing every missing, unexpected and mis-shaped key (with the
  expected shape)."""
  files = files if files is not None else SafetensorsDir(path)
  present = set(files.names) | {k for ks in files.missing_files.values() for k in ks}
  scheme = "llada" if any(k.startswith("model.transformer.") for k in present) else "llada_v"
  shapes = {k: tuple(v.shape) for k, v in flat_params(abstract_model(cfg)[1]).items()}
  check_table_covers(shapes)
  expected: dict[str, tuple[str, tuple[int, ...]]] = {}  # hf name -> (param, hf shape)
  sources: dict[str, ParamSource] = {}
  for param, shape in shapes.items():
    e = ENTRIES[param]
    n = shape[0] if e.stacked else None
    names = [e.name(scheme, i) for i in range(n)] if e.stacked else [e.name(scheme)]
    sources[param] = ParamSource(e, shape, names)
    hs = hf_shape(e, shape[1:] if e.stacked else shape)
    for name in names:
      expected[name] = (param, hs)

  # Groups with no tensor at all in the checkpoint come from init (LLM-only checkpoints).
  initialized, problems = [], []
  for group in GROUPS[1:]:
    names = [nm for p, s in sources.items() if ENTRIES[p].group == group for nm in s.names]
    if not any(nm in present for nm in names) and not any(
        k.startswith(_V) for k in present if group == "vision"):
      if strict:
        problems += [f"missing: {nm} (expected shape {fmt(expected[nm][1])}) [no {group} tensors in the "
                     f"checkpoint; strict]" for nm in names]
      initialized += [p for p in sources if ENTRIES[p].group == group]
  init_set = set(initialized)

  missing_file_of = {k: f for f, ks in files.missing_files.items() for k in ks}
  for name, (param, hs) in expected.items():
    if param in init_set:
      continue
    if name in missing_file_of:
      problems.append(f"missing: {name} (expected shape {fmt(hs)}) [shard file {missing_file_of[name]} "
                      f"listed in {INDEX_FILE} does not exist]")
    elif name not in files.file_of:
      problems.append(f"missing: {name} (expected shape {fmt(hs)})")
    else:
      got = files.shape(name)
      if got != hs:
        problems.append(f"wrong shape: {name} has {fmt(got)}, expected {fmt(hs)}")
      elif not np.issubdtype(files.dtype(name), np.floating) and files.dtype(name) != ml_dtypes.bfloat16:
        problems.append(f"wrong dtype: {name} is {files.dtype(name)}, expected a floating dtype")
  extras = []
  for name in files.names:
    if name in expected:
      continue
    if is_extra(name, cfg):
      extras.append(name)
    else:
      why = beyond_config(name, cfg)
      problems.append(f"unexpected: {name} (shape {fmt(files.shape(name))})" + (f" [{why}]" if why else ""))
  for f, ks in files.missing_files.items():
    for k in ks:
      if k in expected:
        continue
      if is_extra(k, cfg):
        problems.append(f"missing: {k} (unused by the model, kept on convert) [shard file {f} listed in "
                        f"{INDEX_FILE} does not exist]")
      else:
        problems.append(f"unexpected: {k} [its shard file {f} does not exist]")
  if problems:
    raise CheckpointMismatchError(path, problems)
  params = {p: s for p, s in sources.items() if p not in init_set}
  return Plan(path, scheme, params, initialized, extras, files)


def check_orbax(path: str, stored: Mapping[str, tuple], want: Mapping[str, tuple[int, ...]]) -> None:
  """Raises CheckpointMismatchError unless the Orbax directory's {param: (shape, dtype)} holds exactly the
  parameters `want` ({param: shape}) at their shapes."""
  problems = []
  for k, shape in want.items():
    if k not in stored:
      problems.append(f"missing: {k} (expected shape {fmt(shape)})")
    elif stored[k][0] != shape:
      problems.append(f"wrong shape: {k} has {fmt(stored[k][0])}, expected {fmt(shape)}")
  problems += [f"unexpected: {k} (shape {fmt(stored[k][0])})" for k in stored if k not in want]
  if problems:
    raise CheckpointMismatchError(path, problems)
