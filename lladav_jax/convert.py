"""Offline conversion between Hugging Face LLaDA-V / LLaDA safetensors and our Orbax layout.

    python -m lladav_jax.convert hf-to-orbax SRC DST [--overwrite] [--strict] [--vision-config F]
    python -m lladav_jax.convert hf-to-orbax LLADA_8B_INSTRUCT DST --vision-tower SIGLIP_DIR [--seed N]   # stage 0
    python -m lladav_jax.convert orbax-to-hf SRC DST [--overwrite] [--shard-size 5GB]

A converted directory holds:
    params/                 Orbax checkpoint of the parameter tree (our layout, each parameter at its
                            source dtype: bf16 stays bf16), written parameter by parameter
    lladav_config.json      our ModelConfig (ModelConfig.to_json)
    hf_manifest.json        every source tensor's HF name, dtype and shape, the naming scheme
    extras.safetensors      source tensors the model does not use, verbatim (if any)
    config.json, tokenizer and other auxiliary files of the source, copied (an assembled
                            checkpoint: the LLM's files, config.json rewritten in the LLaDA-V layout)

hf -> orbax -> hf is bit-identical (names, dtypes, bytes) for a LLaDA-V source; an assembled one (stage 0:
LLM + SigLIP + initialised projector and newline) is exported in the released LLaDA-V layout. Both
directions stream: hf-to-orbax holds about one stacked parameter on the host, orbax-to-hf one stacked
parameter plus one output shard. Output is written into `DST.tmp-XXXX` and renamed into place at the
end; an existing DST is an error unless `overwrite`; a failure leaves no DST.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from typing import Iterator

import jax
import ml_dtypes
import numpy as np

from lladav_jax import weights as W
from lladav_jax.model import abstract_model

# not __name__, which is "__main__" under python -m: outside "lladav_jax", whose INFO lines main() shows
log = logging.getLogger("lladav_jax.convert")

PARTIAL_SAVE_BYTES = 64 << 20  # parameters are saved to Orbax in batches of about this size
_GC_BYTES = 16 << 20  # collect cycles once this much is released, not after every release (a collection walks the heap)


def _progress(total: int, desc: str):
  """A tqdm bar over the tensors (what the count counts) on stderr, only when stderr is a terminal: logs and tests
  parse no carriage returns."""
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not sys.stderr.isatty(),
              dynamic_ncols=True, mininterval=0.5)


def parse_size(s: int | str) -> int:
  """'5GB' / '500MB' / '2GiB' / 1234 -> bytes (decimal units as in Hugging Face; *iB binary)."""
  if isinstance(s, int):
    return s
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", s.upper())
  if not m:
    raise ValueError(f"cannot parse size {s!r}")
  num, unit, b = float(m.group(1)), m.group(2), m.group(3) or "B"
  base = 1024 if b == "IB" else 1000
  return int(num * base ** " KMGT".index(unit or " "))


@contextlib.contextmanager
def _atomic_dir(dst: str, overwrite: bool) -> Iterator[str]:
  """A fresh `DST.tmp-XXXX` beside DST, renamed to DST on success and removed on failure."""
  dst = os.path.abspath(dst)
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
  try:
    yield tmp
    if os.path.exists(dst):
      old = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".old-", dir=parent)
      os.rename(dst, os.path.join(old, "x"))
      os.rename(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


NO_TOWER = ("{src} has no vision tower weights (an LLM-only checkpoint such as LLaDA-8B-Instruct). Bring the "
            "pretrained tower in: `python -m lladav_jax.convert hf-to-orbax {src} DST --vision-tower SIGLIP_DIR` "
            "(a SiglipModel or SiglipVisionModel directory, e.g. google/siglip2-so400m-patch14-384); a random "
            "tower only with --random-vision-tower (tests, demos: stage 1 freezes the tower)")


def hf_to_orbax(src: str, dst: str, *, cfg=None, vision_json: dict | None = None, vision_tower: str | None = None,
                random_vision_tower: bool = False, overwrite: bool = False, strict: bool = False,
                seed: int = 0) -> str:
  """Converts an HF LLaDA-V (or original LLaDA) safetensors directory to our Orbax layout at `dst`.

  `cfg`: the ModelConfig (default: from SRC/config.json, with `vision_json` for the tower).
  `vision_tower`: a SigLIP directory whose `vision_model.*` tensors become the tower (stage 0: SRC is
  an LLM-only checkpoint; the geometry comes from its config.json). Projector and image newline that
  the source lacks are initialised as the original does for stage 1 (nn.Linear's default
  U(+-1/sqrt(fan_in)); randn(D)/sqrt(D)) with `seed`, recorded in the manifest; a source without a
  tower is an error unless `random_vision_tower` (or `strict`: anything absent is). An assembled
  result (anything initialised or brought in) is exported by `orbax_to_hf` in the released LLaDA-V
  layout: LLaMA names and a LLaDA-V config.json. Returns `dst`.
  """
  from orbax.checkpoint.experimental import v1 as ocp_v1
  from orbax.checkpoint.experimental.v1 import partial as ocp_partial
  from safetensors.numpy import save_file

  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
  with open(os.path.join(src, "config.json")) as f:
    hf_config = json.load(f)
  files = None
  if vision_tower is not None:
    if vision_json is not None:
      raise ValueError("pass vision_tower or vision_json, not both: the tower's config.json gives its geometry")
    if not os.path.exists(os.path.join(src, "tokenizer.json")):
      raise FileNotFoundError(f"{src}: no tokenizer.json; the assembled checkpoint carries the LLM's tokenizer "
                              f"and chat template (tokenizer_config.json) for every stage")
    vision_json = W.siglip_vision_config(vision_tower)
    files = W.AssembledTensors(src, vision_tower)
  if cfg is None:
    cfg = W.model_config_from_hf(hf_config, vision_json)
  cfg.validate()
  plan = W.plan_hf(src, cfg, strict=strict, files=files)  # raises before anything is written
  init_groups = sorted({W.ENTRIES[p].group for p in plan.initialized})
  if "vision" in init_groups and not random_vision_tower:
    raise ValueError(NO_TOWER.format(src=src))
  assembled = vision_tower is not None or bool(plan.initialized)
  with _atomic_dir(dst, overwrite) as tmp:
    params_dir = os.path.join(tmp, W.PARAMS_DIR)
    tensors, param_dtypes = [], {}
    pending, pending_bytes = {}, 0

    # No defensive copy of our (never mutated) host arrays and no zstd pass: the save then needs
    # little beyond the arrays themselves (weights barely compress anyway).
    ctx = ocp_v1.Context()
    ctx.memory.deepcopy_host_arrays = False
    ctx.array.saving.use_compression = False

    def flush():
      nonlocal pending, pending_bytes
      if pending:
        with ctx:
          ocp_partial.save(params_dir, W.nest(pending))
      if pending_bytes >= _GC_BYTES:
        pending.clear()
        gc.collect()  # free the saved arrays now, not at the next cyclic collection
      pending, pending_bytes = {}, 0

    n_read = sum(len(source.names) for source in plan.params.values())
    log.info("reading %d tensors of %s into %d parameters in %s", n_read, src, len(plan.params), dst)
    with _progress(n_read, "hf-to-orbax: tensors read") as bar:
      for param, source in plan.params.items():
        nbytes = math.prod(source.shape) * W.common_dtype(plan.files.dtype(n) for n in source.names).itemsize
        if pending_bytes + nbytes > PARTIAL_SAVE_BYTES:
          flush()  # before reading, so that a large parameter is never held next to a full batch
        arr = W.read_param(plan, param)
        param_dtypes[param] = str(arr.dtype)
        for i, name in enumerate(source.names):
          tensors.append(dict(name=name, param=param, layer=i if source.entry.stacked else None,
                              dtype=str(plan.files.dtype(name)), shape=list(plan.files.shape(name))))
        pending[param] = arr
        pending_bytes += arr.nbytes
        del arr
        bar.update(len(source.names))
    if plan.initialized:
      log.log(logging.WARNING if "vision" in init_groups else logging.INFO,
              "%s: %d parameters (%s) initialised from seed %d in %s", src,
              len(plan.initialized), ", ".join(init_groups), seed, dst)
      init = W.init_params(cfg, plan.initialized, seed=seed)  # one compile; ~1.6 GB for so400m in f32
      for param in list(init):
        arr = init.pop(param)
        param_dtypes[param] = str(arr.dtype)
        if pending_bytes + arr.nbytes > PARTIAL_SAVE_BYTES:
          flush()
        pending[param] = arr
        pending_bytes += arr.nbytes
      del init
    flush()
    with ctx:
      ocp_partial.finalize(params_dir)

    extras = []
    if plan.extras:
      ex = {}
      for name in plan.extras:
        ex[name] = plan.files.get(name)
        extras.append(dict(name=name, dtype=str(ex[name].dtype), shape=list(ex[name].shape)))
      save_file(ex, os.path.join(tmp, W.EXTRAS_FILE), metadata=plan.files.metadata)
      del ex
    extras = [dict(e, extra=True) for e in extras]
    if assembled:  # exported as a LLaDA-V checkpoint: LLaMA names, the initialised parameters included
      tensors = _llada_v_tensors(plan, cfg, param_dtypes) + extras
    else:  # written back as the source was
      order = {n: i for i, n in enumerate(plan.files.names)}
      tensors = sorted(tensors + extras, key=lambda t: order[t["name"]])
    manifest = dict(
        format=1, scheme="llada_v" if assembled else plan.scheme, source=os.path.abspath(src),
        vision_tower=os.path.abspath(vision_tower) if vision_tower else None, seed=seed,
        safetensors_metadata=plan.files.metadata, tensors=tensors, param_dtypes=param_dtypes,
        initialized=plan.initialized, initialized_groups=init_groups)
    with open(os.path.join(tmp, W.MANIFEST_FILE), "w") as f:
      json.dump(manifest, f, indent=1)
    with open(os.path.join(tmp, W.CONFIG_FILE), "w") as f:
      f.write(cfg.to_json())
    for fname in W.aux_files(src):  # the LLM's tokenizer, chat template, generation config
      if not (assembled and fname == "config.json"):
        shutil.copy2(os.path.join(src, fname), os.path.join(tmp, fname))
    if assembled:
      hf = W.lladav_hf_config(cfg, torch_dtype=W.checkpoint_dtype(src) or "float32",
                              vision_tower=vision_tower or "random",
                              token_ids={k: hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
  log.info("converted %s -> %s (%d tensors, %d extras)", src, dst, len(tensors), len(extras))
  return dst


def _llada_v_tensors(plan, cfg, param_dtypes: dict) -> list[dict]:
  """Manifest entries of every model parameter under its LLaDA-V name: read ones at their source
  dtype, initialised ones at the stored dtype."""
  out = []
  for param, v in W.flat_params(abstract_model(cfg)[1]).items():
    e = W.ENTRIES[param]
    src = plan.params.get(param)
    for i in range(v.shape[0] if e.stacked else 1):
      layer = i if e.stacked else None
      dtype = str(plan.files.dtype(src.names[i])) if src else param_dtypes[param]
      out.append(dict(name=e.name("llada_v", layer), param=param, layer=layer, dtype=dtype,
                      shape=list(W.hf_shape(e, v.shape[1:] if e.stacked else v.shape))))
  return out


def orbax_to_hf(src: str, dst: str, *, shard_size: int | str = "5GB", overwrite: bool = False) -> str:
  """Writes a converted Orbax directory back as HF safetensors shards + model.safetensors.index.json
  (metadata.total_size), with the source's names and per-tensor dtypes (from hf_manifest.json; without
  one: LLaDA-V names at the stored dtypes), the extras, config.json and the auxiliary files."""
  from safetensors import safe_open

  limit = parse_size(shard_size)
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
  stored = W.orbax_metadata(src)
  manifest = W.read_manifest(src)
  if manifest is None:
    manifest = dict(scheme="llada_v", safetensors_metadata={"format": "pt"}, tensors=[])
    for param, (shape, dtype) in stored.items():
      e = W.ENTRIES[param]
      for i in range(shape[0] if e.stacked else 1):
        name = e.name("llada_v", i if e.stacked else None)
        manifest["tensors"].append(dict(name=name, param=param, layer=i if e.stacked else None,
                                        dtype=str(dtype), shape=list(W.hf_shape(e, shape[1:] if e.stacked else shape))))
  by_param: dict[str, list[dict]] = {}
  extras = []
  for t in manifest["tensors"]:
    (extras if t.get("extra") else by_param.setdefault(t["param"], [])).append(t)
  missing = [f"missing: {p} (needed for {ts[0]['name']}...)" for p, ts in by_param.items() if p not in stored]
  if missing:
    raise W.CheckpointMismatchError(src, missing)
  meta = manifest.get("safetensors_metadata") or {"format": "pt"}

  # Every output tensor in production order (parameter by parameter, then the extras), split into
  # shards up front so that each file's header can be written first and its data streamed after it.
  order = [t for ts in by_param.values() for t in ts] + extras
  sizes = [math.prod(t["shape"]) * np.dtype(_dtype(t["dtype"])).itemsize for t in order]
  shards, cur, cur_bytes = [], [], 0
  for t, nb in zip(order, sizes):
    if cur and cur_bytes + nb > limit:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append(t)
    cur_bytes += nb
  if cur:
    shards.append(cur)
  n = len(shards)

  log.info("writing %d tensors of %s as %d safetensors shards in %s", len(order), src, n, dst)
  with _atomic_dir(dst, overwrite) as tmp, _progress(len(order), "orbax-to-hf: tensors written") as bar:
    cached: dict[str, np.ndarray] = {}
    extras_file = os.path.join(src, W.EXTRAS_FILE)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
      fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
      with _SafetensorsWriter(os.path.join(tmp, fname), shard, meta) as w:
        for t in shard:
          if t.get("extra"):
            with safe_open(extras_file, framework="np") as f:
              arr = f.get_tensor(t["name"])
          else:
            if t["param"] not in cached:
              big = sum(v.nbytes for v in cached.values()) >= _GC_BYTES
              cached.clear()  # one stacked parameter on the host at a time
              value = None
              if big:  # reference cycles left by the restore would otherwise keep it alive for a while
                gc.collect()
              cached[t["param"]] = W.read_orbax_param(src, t["param"])
            e, value = W.ENTRIES[t["param"]], cached[t["param"]]
            arr = W.to_hf(e, value[t["layer"]] if e.stacked else value)
          arr = arr.astype(_dtype(t["dtype"]), copy=False)
          w.write(t["name"], arr)
          weight_map[t["name"]] = fname
          total += arr.nbytes
          del arr
          bar.update(1)
    cached.clear()
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    for fname in W.aux_files(src):
      shutil.copy2(os.path.join(src, fname), os.path.join(tmp, fname))
  log.info("exported %s -> %s (%d tensors in %d shards, %d bytes)", src, dst, len(weight_map), n, total)
  return dst


_ST_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
             "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


class _SafetensorsWriter:
  """Streams one safetensors file: the header (from the planned names, dtypes and shapes) first, then
  each tensor's bytes as it arrives, in the planned order. No copy of the file is built in memory."""

  def __init__(self, path: str, tensors: list[dict], metadata: dict | None):
    header, off = {}, 0
    for t in tensors:
      nb = math.prod(t["shape"]) * np.dtype(_dtype(t["dtype"])).itemsize
      header[t["name"]] = {"dtype": _ST_CODES[t["dtype"]], "shape": list(t["shape"]), "data_offsets": [off, off + nb]}
      off += nb
    if metadata:
      header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    self._f = open(path, "wb")
    self._f.write(struct.pack("<Q", len(h)) + h)
    self._pending = [(t["name"], header[t["name"]]) for t in tensors]
    self._i = 0

  def write(self, name: str, arr) -> None:
    want_name, h = self._pending[self._i]
    nb = h["data_offsets"][1] - h["data_offsets"][0]
    if name != want_name or list(arr.shape) != h["shape"] or _ST_CODES[str(arr.dtype)] != h["dtype"] or arr.nbytes != nb:
      raise RuntimeError(f"safetensors writer: got {name} {arr.dtype}{list(arr.shape)}, expected {want_name} "
                         f"{h['dtype']}{h['shape']}")
    self._f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
    self._i += 1

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    self._f.close()
    if exc_type is None and self._i != len(self._pending):
      raise RuntimeError(f"safetensors writer: {len(self._pending) - self._i} tensors were not written")


def _dtype(name: str):
  return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _size_arg(s: str) -> int:
  try:
    return parse_size(s)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


EXIT_STATUS = """Exit status: 0 converted; 1 the conversion failed (one `error:` line: a checkpoint with missing,
unexpected or mis-shaped tensors, each named; DST exists without --overwrite; an LLM-only SRC without a vision tower;
nothing is left at DST); 2 a usage error (argparse: a missing or unknown argument, SRC not a directory)."""


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m lladav_jax.convert", description=__doc__.split("\n\n")[0],
                              epilog=EXIT_STATUS)
  sub = p.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("hf-to-orbax", help="HF safetensors directory -> Orbax directory", epilog=EXIT_STATUS)
  a.add_argument("src")
  a.add_argument("dst")
  a.add_argument("--overwrite", action="store_true")
  a.add_argument("--vision-tower", metavar="SIGLIP_DIR",
                 help="stage 0: a SigLIP checkpoint (SiglipModel or SiglipVisionModel) whose vision tower joins the "
                      "LLM-only SRC (LLaDA-8B-Instruct); the projector and newline are initialised as the original's")
  a.add_argument("--random-vision-tower", action="store_true",
                 help="allow an LLM-only SRC without --vision-tower: the tower is random (tests, demos)")
  a.add_argument("--strict", action="store_true", help="error if vision/projector/newline weights are absent")
  a.add_argument("--vision-config", help="the vision tower's config.json, when SRC/config.json has none")
  a.add_argument("--seed", type=int, default=0, help="init seed of the parameters the sources lack (manifest)")
  b = sub.add_parser("orbax-to-hf", help="Orbax directory -> HF safetensors directory", epilog=EXIT_STATUS)
  b.add_argument("src")
  b.add_argument("dst")
  b.add_argument("--overwrite", action="store_true")
  b.add_argument("--shard-size", default="5GB", type=_size_arg, help="largest output file, e.g. 5GB, 500MB, 2GiB")
  args = p.parse_args(argv)
  sp = a if args.cmd == "hf-to-orbax" else b
  if not os.path.isdir(args.src):  # argparse's usage and exit status 2, before anything is read
    sp.error(f"src {args.src!r}: no such directory")
  for flag, path, isdir in (("--vision-tower", getattr(args, "vision_tower", None), True),
                            ("--vision-config", getattr(args, "vision_config", None), False)):
    if path and not (os.path.isdir(path) if isdir else os.path.isfile(path)):
      sp.error(f"{flag} {path!r}: no such {'directory' if isdir else 'file'}")
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("lladav_jax").setLevel(logging.INFO)
  if "JAX_PLATFORMS" not in os.environ:  # conversion is host work: keep accelerators free
    jax.config.update("jax_platforms", "cpu")  # the flag, not the variable: jax read that at import
  try:
    if args.cmd == "hf-to-orbax":
      vision = None
      if args.vision_config:
        with open(args.vision_config) as f:
          vision = json.load(f)
      hf_to_orbax(args.src, args.dst, vision_json=vision, vision_tower=args.vision_tower,
                  random_vision_tower=args.random_vision_tower, overwrite=args.overwrite, strict=args.strict,
                  seed=args.seed)
    else:
      orbax_to_hf(args.src, args.dst, shard_size=args.shard_size, overwrite=args.overwrite)
  except (W.CheckpointMismatchError, FileExistsError, FileNotFoundError, ValueError) as e:
    # what the user can act on, named in the message (the checkpoint and config readers raise these for what they
    # refuse); anything else keeps its traceback, exit status 1 too
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
