r"""Training configs for LLaDA-V: the built-in demo and the original's stages (docs/ORIGINAL.md, "Training stages").

    python -m lladav_jax.train --config=configs/finetune.py --workdir=runs/demo            # = :demo
    python -m lladav_jax.train --config=configs/finetune.py:stage2_si --workdir=/shared/runs/si \
        --config.data.path=/data/mammoth_si_10M.json --config.data.image_folder=/data/images
    python -m lladav_jax.train --config=configs/finetune.py:finetune,runlocal --workdir=/tmp/t

The argument after ':' is `PRESET[,runlocal][,FIELD=VALUE...]` (big_vision style). `runlocal`
shrinks any preset to a tiny CPU run on synthetic data (tests, smoke runs). Every field can also be
overridden with `--config.FIELD=VALUE` (the config is locked: a misspelt field is an error). Both
forms parse VALUE by the field's type with absl's parsers: `true`/`false`, numbers, a string, a
tuple as a Python literal (`data.buckets=(4096,8192)`, `optim.trainable=('projector',)`); a field
that defaults to None (a placeholder) takes a value of its declared type. The suffix is applied
after the preset, `--config.FIELD` flags after the suffix:

    --config='configs/finetune.py:stage2_si,train.global_batch_size=128,data.buckets=(4096,8192)'
    python -m lladav_jax.train --config=configs/finetune.py:stage1 --print_config   # the result, resolved

Presets (hyperparameters of the original's scripts; HF Trainer AdamW (0.9, 0.999, 1e-8), weight
decay 0, clip 1.0, warmup ratio 0.03, cosine, 1 epoch, gradient checkpointing):
  demo        config.small LLaDA-V (vocabulary from the demo tokenizer), from scratch (the vision tower
              pre-trained on the pictures' captions, then frozen), synthetic shapes-and-colours VQA
              generated on first use; CPU; prints test exact-match at the end.
  stage1      projector only, LR 1e-3, global batch 64, length 8192, square/flat images, llada_plain;
              init: the stage-0 checkpoint (`convert hf-to-orbax LLaDA-8B-Instruct DST --vision-tower
              siglip2-so400m-patch14-384`: projector and newline initialised as the original's).
  stage2_si   everything, LR 1e-5 (vision tower 2e-6), batch 256, length 8192, anyres_max_4;
              init: the stage-1 output.
  stage2_ov   as stage2_si, length 16384, multi-image + video; init: the stage-2 SI output.
  stage3      as stage2_si (VisualWebInstruct / mix), length 8192 (16384 for the mix: override
              data.seq_len); init: the stage-2 OV output.
  finetune    everything, LR 1e-5 / 2e-6, batch 64 rows, length 8192, sequence packing (data.packing: several
              conversations a row, 37 tiles a row); init: GSAI-ML/LLaDA-V converted.
  lora        finetune with LoRA on the LLM (q/k/v/o/gate/up/down; the original's `--lora_enable`: rank 64,
              alpha 16, dropout 0.05, every LLM Linear but lm_head) and the projector trained in full
              (its `mm_tunable_parts=mm_mlp_adapter`); vision tower and LLM base frozen. LR 2e-4 for the
              adapters, 2e-5 for the projector (LLaVA's finetune_lora.sh: `--learning_rate 2e-4
              --mm_projector_lr 2e-5`). Checkpoints hold the adapters + projector; the export is merged.
"""
import dataclasses

import ml_collections
from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import tuple_parser

# lladav_jax.config.LORA_TARGETS (this file imports no JAX; tests/test_lora.py checks they agree)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = ("demo", "stage1", "stage2_si", "stage2_ov", "stage3", "finetune", "lora")


def _split(arg: str) -> list[str]:
  """`arg` split at the commas outside brackets and quotes (a tuple value keeps its commas)."""
  parts, cur, depth, quote = [], "", 0, None
  for ch in arg:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(cur)
      cur = ""
      continue
    cur += ch
  return parts + [cur]


def _parse(arg: str):
  preset, runlocal, kv = "demo", False, {}
  for i, tok in enumerate(t.strip() for t in _split(arg or "") if t.strip()):
    if tok == "runlocal":
      runlocal = True
    elif "=" in tok:
      k, v = tok.split("=", 1)
      kv[k.strip()] = v.strip()
    elif i == 0:
      preset = tok
    else:
      raise ValueError(f"config argument {arg!r}: cannot parse {tok!r} (use PRESET[,runlocal][,key=value])")
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
  return preset, runlocal, kv


def _data_config():
  from lladav_jax.data.pipeline import DataConfig
  d = ml_collections.ConfigDict(dataclasses.asdict(DataConfig()))  # the pipeline's fields and defaults
  d.kind = "llava"  # "llava" (data.path) | "demo" (generated) | "synthetic" (random tokens, perf runs)
  d.demo_root = "~/.cache/lladav_jax/demo"
  d.synthetic_tiles = 1
  d.synthetic_answer_frac = 0.3
  return d


def _eval_task_names():
  try:
    from lladav_jax.eval import TASKS  # imports no JAX
    return sorted(TASKS)
  except ImportError:
    return ["demo"]


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = ""
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.preset = "llada_v_8b"  # lladav_jax.config preset, or "checkpoint" (init.checkpoint's config)
  c.model.vocab_from_tokenizer = False  # vocab_size / mask_token_id from the tokenizer (the demo)
  c.model.vocab_size = config_dict.placeholder(int)
  c.model.mask_token_id = config_dict.placeholder(int)
  c.model.dtype = config_dict.placeholder(str)  # compute dtype; default: the preset's
  c.model.param_dtype = config_dict.placeholder(str)  # master weights
  c.model.scan_layers = config_dict.placeholder(bool)
  c.model.remat_policy = config_dict.placeholder(str)
  c.model.attention_impl = config_dict.placeholder(str)  # auto | dense | blockwise | splash | cudnn | pallas_gpu
  c.model.attention_block_q = config_dict.placeholder(int)
  c.model.attention_block_kv = config_dict.placeholder(int)
  # LoRA on the LLM's projections (rank 0: none); trained as the optim group "lora".
  c.model.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.05, targets=LORA_TARGETS))

  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ""  # converted Orbax dir (or HF dir) with the initial weights; "" = random init
  c.tokenizer_dir = ""  # default: init.checkpoint (or the demo tokenizer)

  c.data = _data_config()
  c.image = ml_collections.ConfigDict()
  c.image.aspect = "anyres_max_4"  # "anyres_max_N" | "pad" | "square"
  c.image.multi_image = "pad"
  # several images at eval and in the saved model: the original's eval path (pad_flat: 729 each, no newline)
  c.image.eval_multi_image = "pad_flat"
  c.image.video_pool_stride = 2
  c.image.video_newline = "grid"
  c.image.exif_transpose = False  # the original never rotates by EXIF orientation

  # preset: "fsdp_tp" (FSDP over fsdp, tensor parallel over tensor), "fsdp" (pure FSDP over fsdp x tensor:
  # a factored axis for sizes one axis cannot divide), "dp" (weights replicated). See lladav_jax/sharding.py.
  c.mesh = ml_collections.ConfigDict(dict(preset="fsdp_tp", data=1, fsdp=-1, tensor=1))

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 64
  c.train.grad_accum_steps = 1
  c.train.num_steps = -1  # -1: num_epochs over the training set
  c.train.num_epochs = 1.0

  c.loss = ml_collections.ConfigDict(dict(eps=1e-3, antithetic=False, logits_chunk=1024))

  c.optim = ml_collections.ConfigDict()
  c.optim.trainable = ("vision", "projector", "llm")
  c.optim.lr = 1e-5
  # per-group peak LR (None: optim.lr); the original's mm_vision_tower_lr = 2e-6
  c.optim.group_lr = ml_collections.ConfigDict({g: config_dict.placeholder(float)
                                                for g in ("vision", "projector", "llm", "lora")})
  c.optim.group_lr.vision = 2e-6
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0
  c.optim.warmup_ratio = 0.03
  c.optim.schedule = "cosine"

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True, enabled=True))
  # At the end, also write the parameters as a model directory (<workdir>/model) that
  # `lladav_jax.eval`, `lladav_jax.generate` and `LLaDAV.from_pretrained` load.
  c.checkpoint.export_model = True
  c.log = ml_collections.ConfigDict(dict(every_steps=1, tensorboard=True, progress=True, profile_start_step=-1,
                                         profile_num_steps=3))
  # Evals during training (lladav_jax.eval): task names, {task: data path}, every N steps (0 = never).
  c.eval = ml_collections.ConfigDict()
  c.eval.tasks = ()
  c.eval.data = ml_collections.ConfigDict({t: config_dict.placeholder(str) for t in _eval_task_names()})
  c.eval.every_steps = 0
  c.eval.at_end = True
  c.eval.limit = 64
  c.eval.batch_size = 8
  c.eval.gen_length = config_dict.placeholder(int)  # None: the task's own settings
  c.eval.block_length = config_dict.placeholder(int)
  c.eval.steps = config_dict.placeholder(int)
  c.eval.image_folder = ""  # relative image paths of eval.data ("": each data file's folder)

  # Before the first step of a fresh run: the vision tower pre-trained on image-caption pairs with SigLIP's
  # sigmoid loss (lladav_jax/training/vision_pretrain.py), for a tower trained from scratch. 0 steps: none.
  c.vision_pretrain = ml_collections.ConfigDict(dict(steps=0, batch_size=128, lr=1e-3, embed_dim=64, data="",
                                                     image_folder=""))
  c.peak_flops_per_device = 0.0  # 0: from the device-kind table (CPU: measured with a matmul)
  c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=-1, process_id=-1))
  return c


def _stage(c, *, lr, group_lr, batch, seq_len, init, per_device=1, trainable=("vision", "projector", "llm")):
  c.model.preset = "checkpoint"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat_policy = "minimal"  # the original trains with gradient checkpointing
  c.model.scan_layers = True
  c.init.checkpoint = init
  c.optim.lr = lr
  for g in ("vision", "projector", "llm", "lora"):
    c.optim.group_lr[g] = group_lr.get(g)
  c.optim.trainable = tuple(trainable)
  c.train.global_batch_size = batch
  # the original EOS-pads each GPU's micro-batch of per_device_train_batch_size rows on its own
  c.data.pad_group_size = per_device
  c.data.seq_len = seq_len
  # 6 x 6 anyres grid + base (anyres_max_4's largest) = 37 tiles; a 32-frame video: 32. Each batch's pixels take
  # the smallest tile bucket (data.tile_buckets) that holds its largest sample.
  c.data.tile_budget = 37
  c.data.num_workers = 8
  c.checkpoint.every_steps = 1000


# preset: (init checkpoint, global batch, sequence length, data, image folder). Each stage starts from
# the model the previous one writes (<workdir>/model; workdirs as in the README's walk-through).
_FULL_STAGES = {
    "stage2_si": ("exp/llada_v_stage1/model", 256, 8192, "data/MAmmoTH-VL/mammoth_si_10M.json", "data/MAmmoTH-VL/images"),
    "stage2_ov": ("exp/llada_v_si10M/model", 256, 16384, "data/MAmmoTH-VL/mammoth_ov_2M.json", "data/MAmmoTH-VL/images"),
    "stage3": ("exp/llada_v_ov2M/model", 256, 8192, "data/VisualWebInstruct/mixed_conversation.json",
               "data/VisualWebInstruct/images"),
    "finetune": ("model/LLaDA-V-orbax", 64, 8192, "data/finetune.json", "data/images"),
}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  preset, runlocal, kv = _parse(arg)
  c = base_config()
  c.preset = preset
  if preset == "demo":
    c.model.preset = "small"
    c.model.vocab_from_tokenizer = True
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.data.kind = "demo"
    c.image.aspect = "pad"  # a picture is one 56 px tile (the demo data's image config; your own data's too)
    c.image.eval_multi_image = "pad"  # our own model: evaluated on the path it is trained on
    c.data.seq_len = 104  # the longest demo sample has 98 tokens (one 56 px tile an image, 16 patches + a newline)
    c.data.buckets = (104,)
    c.data.tile_budget = 2
    c.data.read_threads = 1
    c.train.global_batch_size = 32
    # About twice the steps the training accuracy on answers needs to level off (97% by step 300, the two-picture
    # questions staying at chance: bench/demo_steps.py's notes).
    c.train.num_steps = 600
    c.optim.lr = 1e-3
    c.optim.warmup_ratio = 0.03
    c.loss.logits_chunk = 0  # the demo vocabulary is tiny
    # Label only the answers (+ <|eot_id|> and the EOS padding): scored on ~12 structural tokens a sample
    # as well, a from-scratch model stays at the answer prior. The loss formula is unchanged.
    c.data.labels.unmask_tokens = ()
    c.data.labels.label_assistant_header = False
    # The tower is pre-trained on the training pictures' captions first (SigLIP's loss, as the released tower
    # was), then frozen as in stage 1: trained from its random init through the diffusion loss alone it learns
    # colours, not shapes, and at 1e-3 or more its colour features collapse (bench/demo_steps.py's notes).
    c.vision_pretrain.steps = 700
    c.optim.trainable = ("projector", "llm")
    # The demo's questions (data/demo_data.py) are ones this preset learns (bench/demo_steps.py's notes).
    c.checkpoint.every_steps = 300
    c.eval.tasks = ("demo",)  # data filled in from the generated demo set
    c.eval.limit = 300
    c.eval.batch_size = 64
    c.eval.gen_length = 8
    c.eval.block_length = 8
    c.eval.steps = 8
  elif preset == "stage1":
    _stage(c, lr=1e-3, group_lr={}, batch=64, seq_len=8192, init="model/llada_v_stage0_orbax",
           per_device=16, trainable=("projector",))
    c.data.format = "plain"  # llada_plain: "<image>" + caption + "\n"
    c.data.tile_budget = 1
    c.image.aspect = "square"  # the default image_aspect_ratio; merge "flat", 729 tokens
    c.data.path = "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    c.data.image_folder = "data/LLaVA-Pretrain/images"
  elif preset in _FULL_STAGES:  # everything trained, LR 1e-5 with the vision tower at 2e-6
    init, batch, seq_len, path, folder = _FULL_STAGES[preset]
    _stage(c, lr=1e-5, group_lr={"vision": 2e-6}, batch=batch, seq_len=seq_len, init=init)
    c.data.path, c.data.image_folder = path, folder
    if preset == "finetune":
      # Our own fine-tuning, not a paper stage: pack conversations (greedy first-fit, one segment each) so
      # rows of 8192 hold tokens, not padding (useful-token fractions: bench/packing.py, docs/FIDELITY.md row 13).
      # The batch counts rows; the loss is still the mean over conversations. The tile budget (37, as the
      # stages) is per row; each batch's pixels take the smallest tile bucket that holds its fullest row.
      c.data.packing = True
  elif preset == "lora":
    init, batch, seq_len, path, folder = _FULL_STAGES["finetune"]
    _stage(c, lr=2e-4, group_lr={"projector": 2e-5}, batch=batch, seq_len=seq_len, init=init,
           trainable=("lora", "projector"))
    c.model.lora.rank = 64
    c.data.path, c.data.image_folder = path, folder

  if runlocal:  # a tiny CPU run of the same code path: a few steps, no init checkpoint
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "none"
    c.init.checkpoint = ""
    if preset != "demo":  # the demo keeps its model, data and tokenizer; the stages go synthetic
      c.model.preset = "tiny"  # the released image geometry: 729 tokens a 384 px tile
      c.model.vocab_from_tokenizer = False
      c.data.kind = "synthetic"
      c.data.seq_len = 1536
      c.data.buckets = ()
      c.data.tile_budget = 1
      c.data.num_workers = 0
      c.data.packing = False  # synthetic batches are made whole
    c.train.global_batch_size = 8
    c.vision_pretrain.steps = min(c.vision_pretrain.steps, 4)
    c.vision_pretrain.batch_size = 8
    c.data.pad_group_size = min(c.data.pad_group_size, 1)  # any runlocal batch size
    c.train.grad_accum_steps = 1
    c.train.num_steps = 12
    c.loss.logits_chunk = 16
    c.optim.lr = 1e-3
    c.checkpoint.every_steps = 4
    c.eval.tasks = ()
    c.eval.at_end = False
  for k, v in kv.items():
    _set(c, k, v)
  return c


# The parsers `--config.FIELD=VALUE` uses (ml_collections.config_flags), so both forms read a value alike.
_PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser(),
            str: flags.ArgumentParser(), tuple: tuple_parser.TupleParser()}


def _set(c, dotted: str, value: str):
  *path, last = dotted.split(".")
  node = c
  try:
    for p in path:
      node = node[p]
    kind = node.get_type(last)  # a placeholder's declared type when its value is None
  except (KeyError, AttributeError):
    raise ValueError(f"config override {dotted}={value}: no field {dotted!r}") from None
  if kind not in _PARSERS:
    raise ValueError(f"config override {dotted}={value}: {dotted} is a {kind.__name__}, not a single value")
  try:
    node[last] = _PARSERS[kind].parse(value)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config override {dotted}={value}: not a {kind.__name__} ({e})") from None
