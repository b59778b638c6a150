"""FSDP divides the work: at a fixed per-device batch, the compiled train step's per-device temporaries do not
grow with the device count, and no buffer of the per-device program holds the global batch (AOT on the fake
CPU devices; nothing runs). The model has the released image geometry and widths chosen so that no model
dimension equals a batch size here (72 = 3 x 24 LLM, 60 vision, 512 vocabulary)."""
import dataclasses
import math
import re

import jax
import numpy as np
import pytest
from PIL import Image

from lladav_jax import batch as batch_lib, config, sharding
from lladav_jax.api import LLaDAV
from lladav_jax.config import IMAGE_TOKEN_INDEX as IMG
from lladav_jax.inference import SamplingParams, generation
from lladav_jax.training import loss as loss_lib, state as st, step as stp
from lladav_jax.model import abstract_model
from tests.models import random_state
from tests.train_helpers import optim_cfg

CFG = config.tiny().replace(
    llm=dataclasses.replace(config.tiny().llm, hidden_size=72, num_heads=3, num_kv_heads=3, head_dim=24,
                            intermediate_size=144),
    vision=dataclasses.replace(config.tiny().vision, hidden_size=60, intermediate_size=120, num_heads=3))
L = 1536  # one 384 px tile (729 tokens) and text


def compile_step(devices: int, per_device: int = 1):
  mesh = sharding.make_mesh(1, devices, 1, devices=jax.devices()[:devices])
  setup = st.make_setup(CFG, mesh, optim_cfg(), total_steps=10)
  b = devices * per_device
  return stp.compile_train_step(setup, loss_lib.LossConfig(logits_chunk=512), accum=1,
                                batch_shapes=batch_lib.shapes(b, L, 1, CFG.vision.image_size), analysis_only=True)


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
  # ... and nothing of the global batch of 8 but the rows' conversation counts (8 int32: numbering the
  # conversations of the global batch for the noise and the loss's mean needs every row's count)
  with_global = sorted({d for d in dims if 8 in d} - {(8,)})
  assert not with_global, with_global[:10]


def compile_sampler(devices: int, per_device: int = 1):
  """The engine's `advance` for rows sharded over the mesh (a prompt bucket of 1536 positions)."""
  from lladav_jax.inference import engine
  from lladav_jax.inference.engine import EngineConfig, EngineShapes, state as engine_state
  mesh = sharding.make_mesh(1, devices, 1, devices=jax.devices()[:devices])
  graphdef, params = abstract_model(CFG, mesh)
  cfg = EngineConfig(mask_id=CFG.mask_token_id, banned_ids=(1, 2), max_block_length=32)
  shapes = EngineShapes(rows=devices * per_device, prompt_len=L, answer_len=64)
  with jax.set_mesh(mesh):
    state = stp.abstract_batch(mesh, jax.eval_shape(lambda p: engine_state._init(graphdef, cfg, shapes, p), params))
    compiled = engine.advance.lower(graphdef, cfg, params, state, np.int32(1)).compile(stp.ANALYSIS_ONLY)
  return compiled, stp.memory_stats(compiled)


def test_sampler_divides_the_rows():
  """Two rows a device (a global batch of 16 on 8 devices: the device count 8 shows up in the collectives'
  buffers, so the global batch must be another number)."""
  (c8, m8), (_, m2) = compile_sampler(8, per_device=2), compile_sampler(2, per_device=2)
  t2, t8 = m2["temp_size_in_bytes"], m8["temp_size_in_bytes"]
  print(f"sampler per-device temporaries at 2 rows a device: 2 devices {t2 / 2**20:.1f} MiB, 8 devices {t8 / 2**20:.1f} MiB")
  assert abs(t8 - t2) <= 0.1 * t2
  dims = [tuple(int(d) for d in s.split(",")) for s in re.findall(r"\w+\[([0-9,]+)\]", c8.as_text())]
  assert any(d[:2] == (2, L) for d in dims)
  # The one exception is the embedding lookup of the answer tokens in a table sharded on its width: the ids are
  # all-gathered ([16, 64] int32) and each device looks up its slice of the width for every row (the same
  # elements as its own rows at full width), then an all-to-all gives each device its rows.
  per_device = 2 * 64 * CFG.llm.hidden_size
  # The LM head's decision runs on Q' = 32, 16 or 8 positions (block 32, `decode.ladder`): its per-device
  # [2 rows, Q', vocabulary chunk] logits at Q' = 16 are not the global batch.
  from lladav_jax.inference.engine import decode
  head = {(2, q, decode.chunk_size(CFG.llm.vocab_size)) for q in decode.ladder(32)}
  assert head <= set(dims), head - set(dims)
  with_global = sorted({d for d in dims if 16 in d and math.prod(d) > per_device} - head)
  assert not with_global, with_global[:10]


def test_generate_on_8_devices_gives_the_single_device_tokens():
  """LLaDAV.generate places the rows on the model's mesh: the same answers on a (data 2, fsdp 2, tensor 2) mesh
  as on one device (temperature 0 and a seeded temperature > 0)."""
  cfg = config.tiny()
  models = []
  for mesh in (sharding.make_mesh(devices=jax.devices()[:1]), sharding.make_mesh(2, 2, 2)):
    graphdef, _ = abstract_model(cfg)
    models.append(LLaDAV(cfg, graphdef, random_state(cfg, mesh, seed=4), mesh=mesh))
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8))
  prompts = [[5, IMG, 6, 7], [8, 9, 10], [11, 12], [13, IMG, 14]]
  images = [[img], [], [], [img]]
  for temperature in (0.0, 0.8):
    st = SamplingParams(gen_length=16, block_length=8, steps=8, temperature=temperature, seed=3).for_model(models[0])
    one, eight = ([r.token_ids for r in generation.generate_ids(m, prompts, images, params=st)]
                  for m in models)
    assert one == eight and len({t for ids in one for t in ids}) > 4
