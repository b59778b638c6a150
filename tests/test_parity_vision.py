"""Vision parity: transformers SiglipVisionModel with N+1 layers vs our tower with N layers, loaded from a
LLaDA-V-named checkpoint; ours must equal HF's hidden_states[N] (after N layers, before post_layernorm)."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from lladav_jax import sharding, weights
from lladav_jax.model import abstract_model
from tests.test_parity_lladav import tiny_lladav_dir

TOL = 1e-4


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
  ref, d = tiny_lladav_dir(str(tmp_path_factory.mktemp("lladav_v")), seed=11)
  cfg = weights.load_model_config(d, dtype="float32", param_dtype="float32")
  state = weights.load_state(d, cfg, sharding.make_mesh(devices=jax.devices()[:1]))
  graphdef, _ = abstract_model(cfg)
  return ref, d, cfg, nnx.merge(graphdef, state)


def test_vision_tower_equals_hf_hidden_states_n(tower):
  ref, _, cfg, model = tower
  n = cfg.vision.num_layers
  assert n == 2 and ref.siglip.config.num_hidden_layers == n + 1
  px = np.random.default_rng(0).uniform(-1, 1, (3, 384, 384, 3)).astype(np.float32)
  with torch.no_grad():
    out = ref.siglip(pixel_values=torch.from_numpy(px).permute(0, 3, 1, 2), output_hidden_states=True)
  hs = [h.numpy() for h in out.hidden_states]
  ours = np.asarray(jax.jit(lambda x: model.vision(x))(px))
  assert ours.shape == hs[n].shape == (3, 729, 32)  # 27 x 27 patches of 14 px in a 384 px tile
  diff = np.abs(ours - hs[n]).max()
  print(f"vision parity (hidden_states[{n}] of {n + 1} layers): max abs diff {diff:.3g}, std {hs[n].std():.3g}")
  assert diff <= TOL
  # the other read-outs really differ (so the test would catch an off-by-one layer or a post-layernorm)
  assert np.abs(ours - hs[n - 1]).max() > 1e-2 and np.abs(ours - hs[n + 1]).max() > 1e-2
  assert np.abs(ours - out.last_hidden_state.numpy()).max() > 1e-2


def test_the_last_six_pixel_rows_and_columns_are_unread(tower):
  """384 = 27 * 14 + 6: the valid Conv2d never reads the last 6 rows and columns; ours crops them."""
  _, _, _, model = tower
  px = np.random.default_rng(1).uniform(-1, 1, (1, 384, 384, 3)).astype(np.float32)
  edited = px.copy()
  edited[:, 378:] = 5.0
  edited[:, :, 378:] = -5.0
  f = jax.jit(lambda x: model.vision(x))
  np.testing.assert_array_equal(np.asarray(f(px)), np.asarray(f(edited)))
  edited[:, 377, 0] = 5.0  # the last row that is read
  assert np.abs(np.asarray(f(px)) - np.asarray(f(edited))).max() > 1e-3


def test_unused_vision_tensors_are_extras(tower):
  _, d, cfg, _ = tower
  plan = weights.plan_hf(d, cfg)
  v = weights.VISION_PREFIX
  assert v + "post_layernorm.weight" in plan.extras and v + "encoder.layers.2.mlp.fc1.weight" in plan.extras
  assert any(k.startswith(v + "head.") for k in plan.extras)
  assert not plan.initialized
  assert not any(k.startswith(v + "encoder.layers.1.") for k in plan.extras)
