"""FSDP divides the work: at a fixed per-device batch, the compiled train step's per-device temporaries do not
grow with the device count, and no buffer of the per-device program holds the global batch (AOT on the fake
CPU devices; nothing runs). The model has the released image geometry and widths chosen so that no model
dimension equals a batch size here (72 = 3 x 24 LLM, 60 vision, 512 vocabulary)."""
import dataclasses
import re

import jax
import ml_collections
import numpy as np
import pytest

from lladav_jax import config, sharding
from lladav_jax.training import loss as loss_lib, optimizer, state as st, step as stp

CFG = config.tiny().replace(
    llm=dataclasses.replace(config.tiny().llm, hidden_size=72, num_heads=3, num_kv_heads=3, head_dim=24,
                            intermediate_size=144),
    vision=dataclasses.replace(config.tiny().vision, hidden_size=60, intermediate_size=120, num_heads=3))
L = 1536  # one 384 px tile (729 tokens) and text


def compile_step(devices: int, per_device: int = 1):
  mesh = sharding.make_mesh(1, devices, 1, devices=jax.devices()[:devices])
  optim = ml_collections.ConfigDict(dict(trainable=optimizer.GROUPS, lr=1e-3, group_lr={}, b1=0.9, b2=0.999, eps=1e-8,
                                         weight_decay=0.0, clip_norm=1.0, warmup_ratio=0.0, schedule="constant"))
  setup = st.make_setup(CFG, mesh, optim, total_steps=10)
  b, s = devices * per_device, CFG.vision.image_size
  shapes = {"tokens": ((b, L), np.int32), "labels": ((b, L), np.int32), "valid": ((b, L), np.bool_),
            "positions": ((b, L), np.int32), "pixels": ((b, 1, s, s, 3), np.float32),
            "merge_idx": ((b, L, 4), np.int32), "merge_w": ((b, L, 4), np.float32)}
  return stp.compile_train_step(setup, loss_lib.LossConfig(logits_chunk=512), global_batch=b, accum=1,
                                batch_shapes=shapes)


@pytest.fixture(scope="module")
def compiled8():
  return compile_step(8)


def test_per_device_temporaries_do_not_grow_with_devices(compiled8):
  _, mem8 = compiled8
  _, mem2 = compile_step(2)
  t2, t8 = mem2["temp_size_in_bytes"], mem8["temp_size_in_bytes"]
  print(f"per-device temporaries at 1 sample a device: 2 devices {t2 / 2**20:.1f} MiB, 8 devices {t8 / 2**20:.1f} MiB")
  assert abs(t8 - t2) <= 0.1 * t2


def test_no_buffer_holds_the_global_batch(compiled8):
  compiled, _ = compiled8
  dims = [tuple(int(d) for d in s.split(",")) for s in re.findall(r"\w+\[([0-9,]+)\]", compiled.as_text())]
  assert any(d[:2] == (1, L) for d in dims)  # the per-device activations are there ...
  with_global = sorted({d for d in dims if 8 in d})
  assert not with_global, with_global[:10]  # ... and nothing of the global batch of 8
