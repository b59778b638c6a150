"""The typed training run: frozen dataclasses, one per section of the command-line config
(configs/finetune.py), built and validated once by `run_config.resolve`. Below the entry point
nothing reads the ConfigDict. The run's defaults are the presets' (configs/finetune.py); only the
sections that libraries also build by hand (OptimConfig, DataConfig, ...) have defaults of their own.

    RunConfig
      model ModelConfig, image ImageConfig, loss LossConfig, optim OptimConfig  (their own modules)
      data TrainData (pipeline: pipeline.DataConfig), train TrainConfig, mesh MeshConfig,
      checkpoint CheckpointConfig, log LogConfig, eval EvalConfig, distributed DistributedConfig,
      vision_pretrain VisionPretrainConfig (its own module)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from lladav_jax.config import ModelConfig
from lladav_jax.data.pipeline import DataConfig
from lladav_jax.multimodal import ImageConfig
from lladav_jax.training.loss import LossConfig
from lladav_jax.training.optimizer import OptimConfig
from lladav_jax.training.vision_pretrain import VisionPretrainConfig


@dataclasses.dataclass(frozen=True)
class TrainData:
  """`data.*`: where the batches come from."""
  kind: str  # "llava" (pipeline.path) | "demo" (generated; its paths filled in) | "synthetic" (random tokens)
  pipeline: DataConfig  # what the Grain pipeline reads (seq_len and buckets also shape synthetic batches)
  synthetic_tiles: int
  synthetic_answer_frac: float


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  global_batch_size: int
  grad_accum_steps: int
  num_steps: int  # resolved: the config's -1 is train.num_epochs over the training set


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Resolved against the device count: no -1 left. `preset` names the layout (sharding.PRESETS); for
  "fsdp" the third size is the factored fsdp_b axis."""
  data: int
  fsdp: int
  tensor: int
  preset: str = "fsdp_tp"

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.data, self.fsdp, self.tensor


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  enabled: bool
  every_steps: int
  keep: int
  async_save: bool
  export_model: bool  # also write <workdir>/model at the end


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every_steps: int
  tensorboard: bool
  progress: bool
  profile_start_step: int  # -1: no profile
  profile_num_steps: int


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  tasks: tuple[str, ...]
  data: Mapping[str, str]  # task -> data path (the demo's filled in)
  every_steps: int  # 0: never during training
  at_end: bool
  limit: int  # 0: every item
  batch_size: int
  gen_length: int | None  # None: the task's own settings
  block_length: int | None
  steps: int | None
  image_folder: str  # relative image paths of the eval data are read here ("": each data file's folder)

  @property
  def gen_overrides(self) -> dict[str, int]:
    return {k: getattr(self, k) for k in ("gen_length", "block_length", "steps") if getattr(self, k) is not None}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str  # "": auto-detect a cluster (trainer.maybe_initialize_distributed)
  num_processes: int
  process_id: int


@dataclasses.dataclass(frozen=True)
class RunConfig:
  preset: str
  seed: int
  model: ModelConfig
  image: ImageConfig
  eval_image: ImageConfig  # `image` with image.eval_multi_image: evals and the saved model
  data: TrainData
  loss: LossConfig
  optim: OptimConfig
  train: TrainConfig
  mesh: MeshConfig
  checkpoint: CheckpointConfig
  log: LogConfig
  eval: EvalConfig
  distributed: DistributedConfig
  init_checkpoint: str  # converted weights to start from; "" = random init
  tokenizer_dir: str | None
  peak_flops_per_device: float  # 0: from the device-kind table
  vision_pretrain: VisionPretrainConfig = VisionPretrainConfig()  # steps 0: none
  tokenizer: Any = dataclasses.field(default=None, repr=False, compare=False)  # loaded once by resolve

  def to_dict(self) -> dict[str, Any]:
    """Every setting (not the tokenizer), JSON-ready."""
    return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "tokenizer"}


def _plain(v):
  if dataclasses.is_dataclass(v):
    return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
  if isinstance(v, Mapping):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, (tuple, list)):
    return [_plain(x) for x in v]
  return v
