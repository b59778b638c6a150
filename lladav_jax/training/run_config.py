"""The command-line ConfigDict (configs/finetune.py) -> the typed `settings.RunConfig` with
`resolve(cfg)`, which validates it once: one error listing every problem, each naming its config field."""
from __future__ import annotations

import dataclasses
import glob
import math
import os

from lladav_jax import config as model_config
from lladav_jax import multimodal, weights
from lladav_jax import sharding as shd
from lladav_jax.data import demo_data, pipeline, template
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.eval import TASKS
from lladav_jax.training import optimizer, settings
from lladav_jax.training.loss import LossConfig
from lladav_jax.training.vision_pretrain import VisionPretrainConfig

CONVERT_HINT = "run `python -m lladav_jax.convert hf-to-orbax <HF checkpoint dir> {dst}` first"


class ConfigError(ValueError):
  def __init__(self, problems: list[str]):
    self.problems = problems
    super().__init__("invalid training config:\n  " + "\n  ".join(problems))


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  shape = [int(data), int(fsdp), int(tensor)]
  if shape.count(-1) > 1:
    raise ConfigError([f"mesh: at most one of mesh.data/mesh.fsdp/mesh.tensor may be -1, got {shape}"])
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = num_devices // rest if rest and num_devices % rest == 0 else -1
  return tuple(shape)


# ----------------------------------------------------------------------------- sections, field by field

def data_config(d) -> pipeline.DataConfig:
  """The `data` section's pipeline fields (unvalidated; `resolve` checks them)."""
  names = {f.name for f in dataclasses.fields(pipeline.DataConfig)} - {"buckets", "labels"}
  labels = d.labels.to_dict()
  labels["unmask_tokens"] = tuple(labels["unmask_tokens"])
  return pipeline.DataConfig(buckets=tuple(int(b) for b in d.buckets), labels=template.LabelConfig(**labels),
                             **{k: d[k] for k in names})


def optim_config(o) -> optimizer.OptimConfig:
  group_lr = {k: float(v) for k, v in (o.group_lr.to_dict() if o.group_lr else {}).items() if v is not None}
  return optimizer.OptimConfig(trainable=tuple(o.trainable), lr=float(o.lr), group_lr=group_lr, b1=float(o.b1),
                               b2=float(o.b2), eps=float(o.eps), weight_decay=float(o.weight_decay),
                               clip_norm=float(o.clip_norm), warmup_ratio=float(o.warmup_ratio), schedule=o.schedule)


def distributed_config(cfg) -> settings.DistributedConfig:
  """Read before `resolve`: jax.distributed must be initialised before the device count is known."""
  d = cfg.distributed
  return settings.DistributedConfig(coordinator_address=d.coordinator_address, num_processes=int(d.num_processes),
                                    process_id=int(d.process_id))


def lora_problems(lora: model_config.LoraConfig, optim: optimizer.OptimConfig) -> list[str]:
  """The adapters and the trainable groups must agree (model.lora.* itself: ModelConfig.validate)."""
  if lora.enabled and "lora" not in optim.trainable:
    return [f"model.lora.rank={lora.rank} adds adapters but optim.trainable={list(optim.trainable)} does not "
            "train them (add 'lora')"]
  if lora.enabled and "llm" in optim.trainable:
    return [f"optim.trainable={list(optim.trainable)} trains the LLM's base weights under its adapters "
            f"(model.lora.rank={lora.rank}): drop 'llm' (LoRA keeps the base frozen) or set model.lora.rank=0"]
  if not lora.enabled and "lora" in optim.trainable:
    return [f"optim.trainable={list(optim.trainable)} has 'lora' but model.lora.rank=0 (no adapters)"]
  return []


def vision_pretrain_problems(p: VisionPretrainConfig, lora: bool, tokenizer) -> list[str]:
  if p.steps < 0:
    return [f"vision_pretrain.steps={p.steps} must be >= 0 (0: no pre-training)"]
  if p.steps == 0:
    return []
  problems = []
  if not p.data:
    problems.append(f"vision_pretrain.steps={p.steps} needs vision_pretrain.data: a LLaVA JSON of image-caption records "
                    "(a training JSON will do: each record's first answer is taken as its picture's caption), or set "
                    "vision_pretrain.steps=0")
  elif not os.path.isfile(p.data):
    problems.append(f"vision_pretrain.data={p.data!r} does not exist")
  if p.image_folder and not os.path.isdir(p.image_folder):
    problems.append(f"vision_pretrain.image_folder={p.image_folder!r} is not a directory")
  if p.batch_size < 2:
    problems.append(f"vision_pretrain.batch_size={p.batch_size} must be >= 2 (the loss contrasts pairs in a batch)")
  if not p.lr > 0 or p.embed_dim < 1:
    problems.append(f"vision_pretrain.lr={p.lr} and vision_pretrain.embed_dim={p.embed_dim} must be positive")
  if lora:
    problems.append("vision_pretrain.steps > 0 with LoRA: the frozen base is reloaded from init.checkpoint on resume, "
                    "so a pre-trained tower would be lost (set vision_pretrain.steps=0)")
  if tokenizer is None:
    problems.append("vision_pretrain needs a tokenizer for its captions (tokenizer_dir)")
  return problems


def max_image_tokens(icfg: multimodal.ImageConfig) -> int:
  """Upper bound of one image's tokens under `icfg.aspect` (docs/ORIGINAL.md, "Images")."""
  p, g = icfg.tokens_per_tile, icfg.grid
  if icfg.aspect.startswith("anyres_max_"):
    n = icfg.max_area_tiles
    rows = max(i for i, _ in icfg.grid_pinpoints) * g if icfg.grid_pinpoints else g
    return p + int(1.21 * n * p) + rows  # base + (downscaled) grid + one newline per row
  if icfg.aspect == "pad":
    return p + 1
  return p


def _model_config(cfg, tokenizer, problems) -> model_config.ModelConfig | None:
  m = cfg.model
  kw = {}
  if m.preset == "checkpoint":
    try:
      mc = weights.load_model_config(cfg.init.checkpoint)
    except (FileNotFoundError, ValueError) as e:
      problems.append(f"model.preset='checkpoint': cannot read the model config of init.checkpoint: {e}")
      return None
  else:
    if m.preset not in model_config.PRESETS:
      problems.append(f"model.preset={m.preset!r} is unknown; use one of {sorted(model_config.PRESETS)} or 'checkpoint'")
      return None
    if m.vocab_from_tokenizer:
      if tokenizer is None:
        problems.append("model.vocab_from_tokenizer=True but no tokenizer (set tokenizer_dir)")
        return None
      kw.update(vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_id)
    mc = model_config.get(m.preset, **kw) if kw else model_config.get(m.preset)
  llm_over = {}
  if m.vocab_size is not None:
    llm_over["vocab_size"] = int(m.vocab_size)
  if llm_over:
    mc = mc.replace(llm=dataclasses.replace(mc.llm, **llm_over))
  top = {k: m[k] for k in ("mask_token_id", "dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
                                     "attention_block_q", "attention_block_kv")
         if m[k] is not None}
  top["lora"] = model_config.LoraConfig(rank=int(m.lora.rank), alpha=float(m.lora.alpha), dropout=float(m.lora.dropout),
                                        targets=tuple(m.lora.targets))
  return mc.replace(**top) if top else mc


def resolve(cfg, *, num_devices: int, process_count: int) -> settings.RunConfig:
  """Validates `cfg` (raising ConfigError that names every bad field) and builds the typed run it
  describes. The demo data is generated here on first use."""
  problems: list[str] = []
  kind = cfg.data.kind
  data = data_config(cfg.data)
  eval_data = {k: v for k, v in cfg.eval.data.to_dict().items() if v} if cfg.eval.data else {}
  tok_dir = cfg.tokenizer_dir
  vp = cfg.vision_pretrain
  pretrain = VisionPretrainConfig(steps=int(vp.steps), batch_size=int(vp.batch_size), lr=float(vp.lr),
                                  embed_dim=int(vp.embed_dim), data=vp.data, image_folder=vp.image_folder)

  # ---- paths first (nothing else can be checked without them)
  if cfg.init.checkpoint and not os.path.exists(cfg.init.checkpoint):
    problems.append(f"init.checkpoint={cfg.init.checkpoint!r} does not exist; "
                    + CONVERT_HINT.format(dst=cfg.init.checkpoint))
  if cfg.model.preset == "checkpoint" and not cfg.init.checkpoint:
    problems.append("model.preset='checkpoint' needs init.checkpoint")
  if kind == "demo":
    paths = demo_data.ensure_demo_data(os.path.expanduser(cfg.data.demo_root))
    demo = demo_data.demo_data_config(paths)
    data = data.replace(path=paths["train"], image_folder=paths["image_folder"])
    if data.tile_budget < demo.tile_budget:
      problems.append(f"data.tile_budget={data.tile_budget} is less than the demo data's {demo.tile_budget} "
                      "(two-image questions would be skipped)")
    tok_dir = tok_dir or paths["tokenizer_dir"]
    eval_data.setdefault("demo", paths["test"])
    if not pretrain.data:
      pretrain = dataclasses.replace(pretrain, data=paths["captions"], image_folder=paths["image_folder"])
  elif kind == "llava":
    if not data.path:
      problems.append("data.path is empty (a LLaVA JSON/JSONL/YAML, ArrayRecord or tfds:NAME)")
    elif not data.path.startswith("tfds:") and not any(os.path.exists(p) for p in _expand_braces(data.path)) \
        and not _glob_any(data.path):
      problems.append(f"data.path={data.path!r} does not exist")
    if data.image_folder and not os.path.isdir(data.image_folder):
      problems.append(f"data.image_folder={data.image_folder!r} is not a directory")
  elif kind != "synthetic":
    problems.append(f"data.kind={kind!r} must be 'llava', 'demo' or 'synthetic'")
  if not tok_dir and cfg.init.checkpoint and os.path.exists(os.path.join(cfg.init.checkpoint, "tokenizer.json")):
    tok_dir = cfg.init.checkpoint
  if tok_dir and not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
    problems.append(f"tokenizer_dir={tok_dir!r} has no tokenizer.json")
  if kind in ("llava", "demo") and not tok_dir:
    problems.append("no tokenizer: set tokenizer_dir (or use an init.checkpoint that has tokenizer.json)")
  if problems:
    raise ConfigError(problems)

  tokenizer = None
  if tok_dir:
    tokenizer = Tokenizer.from_dir(tok_dir)

  mc = _model_config(cfg, tokenizer, problems)
  if mc is None:
    raise ConfigError(problems)
  if not 0 <= mc.mask_token_id < mc.llm.vocab_size:
    problems.append(f"model.mask_token_id={mc.mask_token_id} is outside the vocabulary (model vocab_size="
                    f"{mc.llm.vocab_size})")
  if tokenizer is not None:
    if tokenizer.mask_id != mc.mask_token_id:
      problems.append(f"model.mask_token_id={mc.mask_token_id} differs from the tokenizer's <|mdm_mask|> id "
                      f"{tokenizer.mask_id} (tokenizer_dir={tok_dir!r})")
    if tokenizer.vocab_size > mc.llm.vocab_size:
      problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens, more than model vocab_size={mc.llm.vocab_size}")
  try:
    mc.validate()
  except ValueError as e:
    problems.append(f"model: {e}")

  # ---- data and images
  if kind != "synthetic":
    problems += pipeline.config_problems(data)
  elif data.packing:
    problems.append("data.packing needs data.kind 'llava' or 'demo': synthetic batches are made whole")
  if kind == "demo":
    icfg = demo_data.demo_image_config(mc.vision.patch_size)
  else:
    try:
      icfg = multimodal.ImageConfig(image_size=mc.vision.image_size, patch_size=mc.vision.patch_size,
                                    aspect=cfg.image.aspect, multi_image=cfg.image.multi_image,
                                    video_pool_stride=int(cfg.image.video_pool_stride),
                                    video_newline=cfg.image.video_newline, exif_transpose=cfg.image.exif_transpose)
    except ValueError as e:  # the message names each bad image.* field
      problems.append(str(e))
      icfg = multimodal.ImageConfig(image_size=mc.vision.image_size, patch_size=mc.vision.patch_size)
  try:
    eval_icfg = dataclasses.replace(icfg, multi_image=cfg.image.eval_multi_image)
  except ValueError as e:
    problems.append(str(e).replace("image.multi_image", "image.eval_multi_image"))
    eval_icfg = icfg
  if icfg.image_size != mc.vision.image_size or icfg.patch_size != mc.vision.patch_size:
    problems.append(f"the images are {icfg.image_size}px tiles of {icfg.patch_size}px patches but the vision tower "
                    f"expects {mc.vision.image_size}/{mc.vision.patch_size}")
  syn_tiles = int(cfg.data.synthetic_tiles)
  if kind != "synthetic":
    need = max_image_tokens(icfg)
    if need > data.seq_len:
      problems.append(f"image.aspect={icfg.aspect!r} gives up to {need} tokens for one image "
                      f"({icfg.tokens_per_tile} per tile), more than data.seq_len={data.seq_len}")
  elif syn_tiles * icfg.tokens_per_tile > data.seq_len // 2:
    problems.append(f"data.synthetic_tiles={syn_tiles} x {icfg.tokens_per_tile} tokens per tile do not fit "
                    f"half of data.seq_len={data.seq_len}")

  # ---- mesh and batch
  m = cfg.mesh
  shape = mesh_shape(m.data, m.fsdp, m.tensor, num_devices)
  if -1 in shape or math.prod(shape) != num_devices:
    problems.append(f"mesh: mesh.data*mesh.fsdp*mesh.tensor = {m.data}*{m.fsdp}*{m.tensor} "
                    f"does not match the {num_devices} devices")
  preset = str(m.get("preset", "fsdp_tp"))
  if preset not in shd.PRESETS:
    problems.append(f"mesh.preset={preset!r} must be one of {sorted(shd.PRESETS)}")
  elif preset == "dp" and shape[1:] != (1, 1):
    problems.append(f"mesh.preset='dp' replicates the weights: mesh.fsdp and mesh.tensor must be 1, got {shape[1:]} "
                    "(set mesh.data=-1 mesh.fsdp=1 mesh.tensor=1)")
  gb, acc = int(cfg.train.global_batch_size), int(cfg.train.grad_accum_steps)
  if gb <= 0 or acc <= 0:
    problems.append("train.global_batch_size and train.grad_accum_steps must be positive")
  else:
    if gb % acc:
      problems.append(f"train.global_batch_size={gb} is not a multiple of train.grad_accum_steps={acc}")
    if gb % process_count:
      problems.append(f"train.global_batch_size={gb} is not a multiple of the {process_count} processes")
    g = data.pad_group_size
    if g and (gb // process_count) % g:
      problems.append(f"data.pad_group_size={g} must divide the {gb // process_count} rows a process loads "
                      "(train.global_batch_size / processes)")
    rows, axes = (shape[0] * shape[1], "mesh.data*mesh.fsdp") if preset == "fsdp_tp" else (math.prod(shape), "the devices")
    if -1 not in shape and (gb // max(acc, 1)) % rows:
      problems.append(f"train.global_batch_size / train.grad_accum_steps = {gb // max(acc, 1)} rows per micro-batch "
                      f"is not a multiple of {axes} = {rows} (the batch axes of mesh.preset={preset!r})")
  # ---- loss / optimizer / eval
  # answer_acc leaves out the labels that pad (batch.extend's EOS) and end a turn (<|eot_id|>)
  padding_ids = tuple(sorted({tokenizer.eos_id, tokenizer.pad_id, tokenizer.eot_id})) if tokenizer is not None else ()
  loss = LossConfig(eps=float(cfg.loss.eps), antithetic=bool(cfg.loss.antithetic), logits_chunk=int(cfg.loss.logits_chunk),
                    padding_ids=padding_ids)
  if not 0 < loss.eps < 1:
    problems.append(f"loss.eps={loss.eps} must be in (0, 1)")
  optim = optim_config(cfg.optim)
  problems += optimizer.config_problems(optim)
  problems += lora_problems(mc.lora, optim)
  e = cfg.eval
  if e.tasks:
    for t in e.tasks:
      if t not in TASKS:
        problems.append(f"eval.tasks: unknown task {t!r}")
      elif t not in eval_data:
        problems.append(f"eval.tasks has {t!r} but eval.data.{t} (its data path) is not set")
      elif not os.path.exists(eval_data[t]):
        problems.append(f"eval.data.{t}={eval_data[t]!r} does not exist")
    if tokenizer is None:
      problems.append("eval.tasks need a tokenizer (tokenizer_dir)")
    if e.image_folder and not os.path.isdir(e.image_folder):
      problems.append(f"eval.image_folder={e.image_folder!r} is not a directory")

  problems += vision_pretrain_problems(pretrain, mc.lora.enabled, tokenizer)

  # ---- steps
  num_steps = int(cfg.train.num_steps)
  if num_steps <= 0 and not problems:
    if kind == "synthetic":
      problems.append("train.num_steps must be set for data.kind='synthetic'")
    else:
      n = len(pipeline.make_source(data, cfg.seed))
      num_steps = int(cfg.train.num_epochs * n) // gb
      if num_steps <= 0:
        problems.append(f"the training set has {n} records: fewer than one global batch of {gb}")
  if problems:
    raise ConfigError(problems)

  c, lg = cfg.checkpoint, cfg.log
  return settings.RunConfig(
      preset=cfg.preset, seed=int(cfg.seed), model=mc, image=icfg, eval_image=eval_icfg,
      data=settings.TrainData(kind=kind, pipeline=data, synthetic_tiles=syn_tiles,
                              synthetic_answer_frac=float(cfg.data.synthetic_answer_frac)),
      loss=loss, optim=optim, train=settings.TrainConfig(global_batch_size=gb, grad_accum_steps=acc, num_steps=num_steps),
      mesh=settings.MeshConfig(*shape, preset=preset),
      checkpoint=settings.CheckpointConfig(enabled=bool(c.enabled), every_steps=int(c.every_steps), keep=int(c.keep),
                                           async_save=bool(c.async_save), export_model=bool(c.export_model)),
      log=settings.LogConfig(every_steps=int(lg.every_steps), tensorboard=bool(lg.tensorboard), progress=bool(lg.progress),
                             profile_start_step=int(lg.profile_start_step), profile_num_steps=int(lg.profile_num_steps)),
      eval=settings.EvalConfig(tasks=tuple(e.tasks), data=eval_data, every_steps=int(e.every_steps), at_end=bool(e.at_end),
                               limit=int(e.limit), batch_size=int(e.batch_size), gen_length=e.gen_length,
                               block_length=e.block_length, steps=e.steps, image_folder=e.image_folder or ""),
      distributed=distributed_config(cfg), init_checkpoint=cfg.init.checkpoint, tokenizer_dir=tok_dir or None,
      peak_flops_per_device=float(cfg.peak_flops_per_device), vision_pretrain=pretrain, tokenizer=tokenizer)


def _expand_braces(p: str) -> list[str]:
  if "{" in p and "}" in p:
    pre, rest = p.split("{", 1)
    mid, post = rest.split("}", 1)
    return [pre + m + post for m in mid.split(",")]
  return [p]


def _glob_any(p: str) -> bool:
  return any(ch in p for ch in "*?[") and bool(glob.glob(p))
