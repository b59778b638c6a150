"""The full forward on a 2x2x2 (data, fsdp, tensor) mesh of the 8 fake CPU devices equals the single-device
forward, for a state initialised on the mesh and for one streamed from an HF checkpoint onto it."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lladav_jax import batch as batch_lib, config, convert, multimodal as mm, sharding, weights
from lladav_jax.config import IMAGE_TOKEN_INDEX
from lladav_jax.model import abstract_model
from tests.models import random_state
from tests.test_parity_lladav import tiny_lladav_dir

TOL = 1e-5
IMAGE_CFG = mm.ImageConfig()  # the released geometry: 384 px tiles, 14 px patches


@pytest.fixture(scope="module")
def mesh8():
  assert len(jax.devices()) == 8
  return sharding.make_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def mesh1():
  return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  img = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
  samples = [([3, IMAGE_TOKEN_INDEX, 9, 10], [img(100, 60)]), ([4, 5, 6], []),
             ([IMAGE_TOKEN_INDEX, 7], [img(50, 50)]), ([8, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX], [img(30, 60), img(60, 30)])]
  exp = [mm.expand(ids, mm.process_sample_images(ims, IMAGE_CFG) if ims else [], IMAGE_CFG) for ids, ims in samples]
  return batch_lib.collate(exp, IMAGE_CFG)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, b):
  model = nnx.merge(graphdef, state)
  return model(b.tokens, b.positions, b.segments, b.pixels, b.merge_idx, b.merge_w)


def run(cfg, state, b, mesh):
  graphdef, _ = abstract_model(cfg)
  b = sharding.put_rows(b, mesh)
  return np.asarray(forward(graphdef, state, b))


def assert_really_sharded(state):
  specs = {k: v.sharding.spec for k, v in weights.flat_params(state).items()}
  assert "fsdp" in specs["llm.layers.attn.q_proj"] and "tensor" in specs["llm.layers.attn.q_proj"]
  assert "tensor" in specs["llm.embed"] and "fsdp" in specs["llm.lm_head"]
  assert len(weights.flat_params(state)["llm.layers.mlp.gate_proj"].addressable_shards) == 8


def test_random_state_forward_on_mesh_equals_single_device(mesh8, mesh1, batch):
  cfg = config.tiny()
  state8, state1 = random_state(cfg, mesh8), random_state(cfg, mesh1)
  assert_really_sharded(state8)
  a, b = run(cfg, state8, batch, mesh8), run(cfg, state1, batch, mesh1)
  diff = np.abs(a - b).max()
  print(f"sharded vs single-device forward (random state): max abs diff {diff:.3g}")
  assert diff <= TOL and np.abs(b).max() > 0.1


def test_streamed_load_onto_mesh_equals_single_device(mesh8, mesh1, batch, tmp_path):
  _, d = tiny_lladav_dir(str(tmp_path / "hf"), seed=3, shards=2)
  cfg = weights.load_model_config(d, dtype="float32", param_dtype="float32")
  # host_stack_bytes=0: every stacked parameter is filled layer by layer on the mesh
  state8 = weights.load_state(d, cfg, mesh8, host_stack_bytes=0)
  state1 = weights.load_state(d, cfg, mesh1)
  assert_really_sharded(state8)
  f8, f1 = weights.flat_params(state8), weights.flat_params(state1)
  for k in f1:
    assert f8[k].sharding.is_equivalent_to(
        weights.flat_params(sharding.state_shardings(abstract_model(cfg)[1], mesh8))[k], f8[k].ndim), k
    np.testing.assert_array_equal(np.asarray(f8[k]), np.asarray(f1[k]), err_msg=k)
  a, b = run(cfg, state8, batch, mesh8), run(cfg, state1, batch, mesh1)
  diff = np.abs(a - b).max()
  print(f"sharded (loaded) vs single-device forward: max abs diff {diff:.3g}")
  assert diff <= TOL
  # the converted Orbax directory restores onto the mesh with the same values and shardings
  ob = convert.hf_to_orbax(d, str(tmp_path / "orbax"))
  r8 = weights.flat_params(weights.load_state(ob, cfg, mesh8))
  for k in f1:
    assert r8[k].sharding.is_equivalent_to(f8[k].sharding, f8[k].ndim), k
    np.testing.assert_array_equal(np.asarray(r8[k]), np.asarray(f1[k]), err_msg=k)
