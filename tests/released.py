"""A tiny checkpoint in the released GSAI-ML/LLaDA-V layout, for the tests of every entry point.

What is real: the tensor names (LLaMA-style LLM, `model.vision_tower.vision_tower.vision_model.*` with the
27th SigLIP layer and the head present, `model.mm_projector.{0,2}`, `model.image_newline`), the image
geometry (384 px tiles, 14 px patches), the vocabulary size (126464) and the special ids (BOS 126080,
EOS 126081, mask 126336, headers 126346/126347, eot 126348), the config.json keys the original's
trainer writes (`mm_vision_tower`, `image_aspect_ratio`, `image_grid_pinpoints` as pixel pairs, ...) with
no `mask_token_id`, and the tokenizer files with the chat template. What is tiny: the widths (LLM 64,
tower 32, two layers each) and the word-level vocabulary of the demo's strings, plus a `vision_config`
for the tiny tower (the released file has none: a missing one means siglip2-so400m).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from lladav_jax.data import demo_data
from tests.test_parity_lladav import VISION, build_torch_lladav, write_hf_dir

VOCAB = 126464
SPECIAL_IDS = {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "[CLS]": 126082, "[gMASK]": 126083,
               "<|mdm_mask|>": 126336, "<role>": 126340, "</role>": 126341, "<|start_header_id|>": 126346,
               "<|end_header_id|>": 126347, "<|eot_id|>": 126348}


def released_config_json(llama_config: dict, keep_layers: int) -> dict:
  """config.json as the original's trainer saves it (LlavaLLaDA), with the tiny tower's vision_config."""
  c = {k: v for k, v in llama_config.items() if k not in ("mask_token_id", "architectures", "model_type")}
  c.update(
      architectures=["LlavaLLaDAModelLM"], model_type="llava_llada", bos_token_id=128000,  # stale, as released
      eos_token_id=126081, pad_token_id=126081, image_aspect_ratio="anyres_max_4",
      image_grid_pinpoints=[[i * 384, j * 384] for i in range(1, 7) for j in range(1, 7)],
      mm_hidden_size=VISION["hidden_size"], mm_newline_position="grid", mm_patch_merge_type="spatial_unpad",
      mm_projector_type="mlp2x_gelu", mm_spatial_pool_mode="bilinear", mm_spatial_pool_stride=2,
      mm_use_im_patch_token=False, mm_use_im_start_end=False, mm_vision_select_feature="patch",
      mm_vision_select_layer=-2, mm_vision_tower="model/siglip2-so400m-patch14-384",
      mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model", tokenizer_padding_side="right",
      vision_config=dict(VISION, model_type="siglip_vision_model", num_hidden_layers=keep_layers + 1))
  return c


def demo_data_vocab(path: str) -> list[int]:
  """Writes the tokenizer files to `path`; returns the ids of its words (specials excluded)."""
  os.makedirs(path, exist_ok=True)
  demo_data.build_tokenizer(demo_data._corpus_texts(), path, model_max_length=16384, special_ids=SPECIAL_IDS)
  with open(os.path.join(path, "tokenizer.json")) as f:
    vocab = json.load(f)["model"]["vocab"]
  return [i for t, i in vocab.items() if t not in SPECIAL_IDS and t != "<|unk|>"]


def write_released_checkpoint(path: str, seed: int = 0, dtype=None):
  """Writes the checkpoint (two safetensors shards + index, config.json, tokenizer files) to `path`, every
  tensor at `dtype` when given (ml_dtypes.bfloat16: as released) and config.json's torch_dtype with it.
  Returns (the PyTorch reference model, path)."""
  ref = build_torch_lladav(seed, vocab=VOCAB)
  # Answers in words: the head's rows of ids the word-level tokenizer lacks are zero, the others scaled up
  # (a random head would pick ids that decode to nothing).
  used = sorted(set(demo_data_vocab(path)))
  with torch.no_grad():
    w = ref.llama.lm_head.weight
    keep = torch.zeros(w.shape[0], 1)
    keep[used] = 4.0
    w.mul_(keep)
  tensors, config_json = ref.tensors(), released_config_json(ref.llama.config.to_dict(), ref.keep_layers)
  if dtype is not None:
    config_json["torch_dtype"] = np.dtype(dtype).name
  write_hf_dir(path, tensors, config_json, shards=2, dtypes={k: dtype for k in tensors} if dtype is not None else None)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": 126080, "eos_token_id": 126081, "pad_token_id": 126081}, f)
  return ref, path
