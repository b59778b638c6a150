"""Typed model configurations: the released LLaDA-V 8B shape and tiny shapes for tests.

Model configs are frozen dataclasses (hashable, so they can be static jit arguments).
Training/run configs live in `configs/` as ml_collections files and embed one of these by name.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

IMAGE_TOKEN_INDEX = -200  # the reference's placeholder id for "an image goes here"
IGNORE_INDEX = -100
TAPS = 4  # merge-plan taps per position: bilinear interpolation reads at most 2x2 source features

# Rematerialisation policies by name: the activations (model/common checkpoint_name tags) each one keeps
# for the backward pass; everything else is recomputed. None: no remat at all.
REMAT_POLICIES: dict[str, tuple[str, ...] | None] = {
    "none": None,
    "minimal_with_context": ("qkv", "context", "attn_out", "mlp_wi", "mlp_out"),
    "minimal": ("qkv", "attn_out", "mlp_wi", "mlp_out"),
    "save_dot_except_mlp": ("qkv", "context", "attn_out"),
    "save_qkv_proj": ("qkv",),
    "full": (),
}


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """LLaDA language model (LLaMA-shaped, bidirectional)."""
  vocab_size: int = 126464
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  intermediate_size: int = 12288
  rope_theta: float = 500000.0
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 16384
  # Std of the normal init of every weight matrix (HF initializer_range); only from-scratch runs use it.
  initializer_range: float = 0.02


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """SigLIP vision tower. `num_layers` is the number of layers kept and run (the reference
  deletes the last of siglip2-so400m's 27 and reads the output before post_layernorm)."""
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_layers: int = 26
  num_heads: int = 16
  patch_size: int = 14
  image_size: int = 384
  layer_norm_eps: float = 1e-6
  # The image processor's normalisation, applied on device to the uint8 tiles: (x / 255 - mean) / std.
  pixel_mean: tuple = (0.5, 0.5, 0.5)
  pixel_std: tuple = (0.5, 0.5, 0.5)

  @property
  def grid(self) -> int:
    """Patches a side: floor, as the original's valid Conv2d (384 px / 14 px -> 27)."""
    return self.image_size // self.patch_size

  @property
  def tokens_per_tile(self) -> int:
    return self.grid * self.grid


# Attention implementations (lladav_jax/model/attention.py): "auto" picks per backend and size; "xla" is
# accepted as an alias of "dense" so that configs naming it still load.
ATTENTION_IMPLS = ("auto", "dense", "blockwise", "splash", "cudnn", "pallas_gpu", "xla")

# The language model's projections LoRA can adapt (LLaVA's find_all_linear_names: every LLM Linear but lm_head).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the LLM's projections: W x + (alpha / rank) * B(A(dropout(x))), B zero at init.
  rank 0: none. Defaults: the original's train.py (`lora_r 64, lora_alpha 16, lora_dropout 0.05`)."""
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple[str, ...] = LORA_TARGETS

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def problems(self) -> list[str]:
    """Every bad field, named as in the training config (model.lora.*)."""
    out = []
    if self.rank < 0:
      out.append(f"model.lora.rank={self.rank} must be >= 0 (0: no adapters)")
    if self.enabled:
      if not self.alpha > 0:
        out.append(f"model.lora.alpha={self.alpha} must be positive")
      if not 0 <= self.dropout < 1:
        out.append(f"model.lora.dropout={self.dropout} must be in [0, 1)")
      bad = [t for t in self.targets if t not in LORA_TARGETS]
      if bad or not self.targets or len(set(self.targets)) != len(self.targets):
        out.append(f"model.lora.targets={list(self.targets)} must be distinct names from {list(LORA_TARGETS)}")
    return out


# float16 is the original's inference dtype (its eval and demo load the model in fp16).
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  llm: LLMConfig = LLMConfig()
  vision: VisionConfig = VisionConfig()
  mask_token_id: int = 126336
  # Compute (activation) dtype and master-weight dtype.
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  # Attention kernel (ATTENTION_IMPLS): "auto" = splash on TPU, cuDNN / Pallas on GPU, else dense while the
  # scores fit and blockwise (flash, O(L) memory) beyond.
  attention_impl: str = "auto"
  # Query / key block of the blockwise and splash kernels (splash rounds up to 128).
  attention_block_q: int = 512
  attention_block_kv: int = 512
  # lax.scan over the stacked layers (True) or an unrolled Python loop (False).
  scan_layers: bool = True
  # Rematerialisation policy name (see model/common.py REMAT_POLICIES).
  remat_policy: str = "none"
  # Low-rank adapters on the LLM (training); exported models have them merged (rank 0).
  lora: LoraConfig = LoraConfig()

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    llm = LLMConfig(**d.pop("llm", {}))
    vision = d.pop("vision", {})
    vision = VisionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vision.items()})
    lora = d.pop("lora", {})
    lora = LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in lora.items()})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
    return cls(llm=llm, vision=vision, lora=lora, **d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  def validate(self) -> None:
    errs = []
    if not 0 <= self.mask_token_id < self.llm.vocab_size:
      errs.append(f"mask_token_id={self.mask_token_id} is outside the vocabulary (vocab_size={self.llm.vocab_size})")
    if self.llm.num_heads % self.llm.num_kv_heads:
      errs.append(f"llm.num_heads={self.llm.num_heads} is not a multiple of llm.num_kv_heads={self.llm.num_kv_heads}")
    if self.llm.head_dim % 2:
      errs.append(f"llm.head_dim={self.llm.head_dim} must be even for RoPE")
    if not 1 <= self.vision.patch_size <= self.vision.image_size:
      # A tile need not be a multiple of the patch (384 / 14: the valid conv leaves 6 px unread), but it
      # must hold at least one patch.
      errs.append(f"vision.patch_size={self.vision.patch_size} must be between 1 and vision.image_size="
                  f"{self.vision.image_size} (a tile holds at least one patch)")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        errs.append(f"{name}={getattr(self, name)!r} must be one of {DTYPES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      errs.append(f"attention_impl={self.attention_impl!r} must be one of {ATTENTION_IMPLS}")
    for name in ("attention_block_q", "attention_block_kv"):
      if getattr(self, name) < 1:
        errs.append(f"{name}={getattr(self, name)} must be positive")
    if self.remat_policy not in REMAT_POLICIES:
      errs.append(f"remat_policy={self.remat_policy!r} must be one of {sorted(REMAT_POLICIES)}")
    errs += self.lora.problems()
    if errs:
      raise ValueError("invalid model config:\n  " + "\n  ".join(errs))


def llada_v_8b() -> ModelConfig:
  """The released GSAI-ML/LLaDA-V: siglip2-so400m/14@384 (26 layers kept) + LLaDA-8B."""
  return ModelConfig()


def tiny(vocab_size: int = 512, mask_token_id: int = 500, **kw) -> ModelConfig:
  """A few-hundred-thousand-parameter model for CPU tests (float32 compute), with the released model's
  image geometry (384 px tiles, 14 px patches: 27 x 27 = 729 tokens a tile, 6 px unread) and tiny widths."""
  cfg = ModelConfig(
      llm=LLMConfig(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, intermediate_size=128, rope_theta=10000.0, max_position_embeddings=16384),
      vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=14,
                          image_size=384),
      mask_token_id=mask_token_id, dtype="float32", param_dtype="float32")
  return cfg.replace(**kw)


def small(vocab_size: int = 512, mask_token_id: int = 500, **kw) -> ModelConfig:
  """The demo model: learns the synthetic task on a CPU in minutes. The tower sees a 56 px picture as 4 x 4
  patches (with 28 px patches, 2 x 2, it separated the shapes far less often: bench/demo_steps.py's notes)."""
  cfg = ModelConfig(
      llm=LLMConfig(vocab_size=vocab_size, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
                    head_dim=32, intermediate_size=384, rope_theta=10000.0, max_position_embeddings=4096,
                    initializer_range=0.06),
      vision=VisionConfig(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, patch_size=14,
                          image_size=56),
      mask_token_id=mask_token_id, dtype="float32", param_dtype="float32")
  return cfg.replace(**kw)


def mid(vocab_size: int = 32000, mask_token_id: int = 31999, **kw) -> ModelConfig:
  """About 64M parameters (60M language model, 3.4M vision): CPU benchmarks of the train step and the sampler."""
  cfg = ModelConfig(
      llm=LLMConfig(vocab_size=vocab_size, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                    head_dim=64, intermediate_size=1536, rope_theta=500000.0),
      vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, patch_size=14,
                          image_size=224),
      mask_token_id=mask_token_id, dtype="float32", param_dtype="float32")
  return cfg.replace(**kw)


PRESETS = {"llada_v_8b": llada_v_8b, "tiny": tiny, "small": small, "mid": mid}


def get(name: str, **kw) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name](**kw)
