"""One sharding vocabulary, three layouts. On 8 fake CPU devices the train step and the sampler give the
numbers of one device under every preset, and the compiled step's inputs are sharded as the rules say.
At the released model's sizes (abstract: nothing allocated), a mesh whose axis cannot divide the large
weights is refused with the parameter and the shapes that work, and the shapes that work hold about
1 / (weight shards) of the parameters + Adam state a device."""
import math

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from lladav_jax import config, sharding
from lladav_jax.api import LLaDAV
from lladav_jax.model import abstract_model
from lladav_jax.inference import SamplingParams, generation
from lladav_jax.training import loss as L, state as st, step as stp, synthetic
from tests.models import host_params
from tests.train_helpers import optim_cfg

# fsdp_tp (the default) on (2, 2, 2): tests/test_train_step.py (loss and gradients), tests/test_fsdp_work.py
# (the sampler's tokens) and tests/test_sharded_forward.py (logits, shardings).
MESHES = {"fsdp": (2, 2, 2), "dp": (8,)}


def _mesh(preset):
  return sharding.make_mesh(*MESHES[preset], preset=preset)


def _step(setup, params, batch):
  state = st.init_state(setup, seed=0, params=params)
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), batch)
  compiled, _ = stp.compile_train_step(setup, L.LossConfig(logits_chunk=16), accum=1,
                                       batch_shapes=shapes)
  gb = jax.tree.map(lambda v: jax.device_put(v, sharding.batch_sharding(setup.mesh, v.ndim)), batch)
  state, m = compiled(state, gb)
  return compiled, float(m["loss"]), float(m["grad_norm"])


SETTINGS = SamplingParams(gen_length=8, block_length=8, steps=4, mask_id=config.tiny().mask_token_id, eot_id=3)
PROMPTS = [[5 + i, 6, 7, 8 + i] for i in range(8)]  # a row a device under dp


@pytest.fixture(scope="module")
def one_device():
  """The single-device numbers every preset must reproduce: a train step's loss and gradient norm, and
  the sampler's tokens."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  setup = st.make_setup(config.tiny(), mesh, optim_cfg(), total_steps=10)
  params = host_params(setup)
  batch = synthetic.make_batch(np.random.default_rng(0), batch=8, seq_len=48, vocab_size=512, mask_token_id=500)
  _, loss, gnorm = _step(setup, params, batch)
  model = LLaDAV.init_random(config.tiny(), seed=2, mesh=mesh)
  tokens = [r.token_ids for r in generation.generate_ids(model, PROMPTS, params=SETTINGS)]
  return dict(params=params, batch=batch, loss=loss, gnorm=gnorm, model=model, tokens=tokens)


# Both runs are slow (~40 and ~75 s, the CI budget): the default preset fsdp_tp gives the single-device numbers in
# the default run (test_train_step: loss and gradients, test_fsdp_work: the sampler's tokens on 8 devices)
@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(MESHES))
def test_every_preset_gives_the_single_device_numbers(preset, one_device):
  ref = one_device
  mesh = _mesh(preset)
  setup = st.make_setup(config.tiny(), mesh, optim_cfg(), total_steps=10)
  compiled, loss, gnorm = _step(setup, ref["params"], ref["batch"])
  np.testing.assert_allclose(loss, ref["loss"], rtol=1e-6)
  np.testing.assert_allclose(gnorm, ref["gnorm"], rtol=1e-5)
  # the compiled step's inputs are sharded as the rules say
  state_in, batch_in = compiled.input_shardings[0]
  q = state_in["params"]["llm"]["layers"]["attn"]["q_proj"]  # [layers, embed, heads, head_dim]
  rows = batch_in.inputs.tokens.spec[0]
  want_q = {"fsdp": P(None, "fsdp", "fsdp_b", None), "dp": P(None, None, None, None)}[preset]
  want_rows = {"fsdp": ("data", "fsdp", "fsdp_b"), "dp": "data"}[preset]
  assert q.spec == want_q and rows == want_rows, (q.spec, rows)
  # the sampler on the same mesh: the same tokens, rows sharded over the batch axes
  one = ref["model"]
  many = LLaDAV(one.cfg, one.graphdef, jax.device_put(one.state, sharding.state_shardings(one.state, mesh)), mesh=mesh)
  assert [r.token_ids for r in generation.generate_ids(many, PROMPTS, params=SETTINGS)] == ref["tokens"]


# ----------------------------------------------------------------------------- the released model's sizes

@pytest.fixture(scope="module")
def params_8b():
  return abstract_model(config.llada_v_8b())[1]


def _leaves(state):
  return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def per_device_state_bytes(state, mesh) -> float:
  """Float32 parameters + Adam's two moments (same shapes, same shardings) held by one device."""
  total = 0.0
  for v in _leaves(state):
    spec = sharding.logical_to_spec(v.get_metadata()["out_sharding"], v.shape, mesh, parameter=True)
    shards = math.prod(mesh.shape[n] for s in spec if s for n in (s if isinstance(s, tuple) else (s,)))
    total += 3 * math.prod(v.shape) * 4 / shards
  return total


@pytest.mark.parametrize("devices,bad", [(24, "llm.layers.attn.q_proj"), (48, "llm.layers.attn.q_proj"),
                                         (256, "vision.layers.fc1")])
def test_uneven_meshes_are_refused_with_the_shapes_that_work(params_8b, devices, bad):
  """4096 and the attention weights are powers of two: no 24- or 48-way split exists (JAX shards evenly),
  and 1152 (the tower) has no 256-way one; the error says which parameter and which meshes work."""
  with pytest.raises(sharding.LayoutError) as e:
    sharding.check_layout(params_8b, AbstractMesh((1, devices, 1), sharding.PRESETS["fsdp_tp"]))
  msg = str(e.value)
  assert bad in msg and "MiB" in msg and "data=" in msg, msg
  best = sharding.working_meshes(params_8b, devices)[0]
  print(f"{devices} devices: {best}")
  assert best == {24: "fsdp_tp: data=3 fsdp=8 tensor=1 [8]", 48: "fsdp_tp: data=3 fsdp=16 tensor=1 [16]",
                  256: "fsdp_tp: data=1 fsdp=128 tensor=2 [256]"}[devices]


@pytest.mark.parametrize("preset,sizes", [("fsdp_tp", (3, 8, 1)), ("fsdp_tp", (3, 16, 1)), ("fsdp", (1, 128, 2)),
                                          ("fsdp_tp", (1, 64, 1))])
def test_working_meshes_divide_the_state(params_8b, preset, sizes):
  """Per-device parameter + optimizer bytes within 10% of the total over the weight shards; what stays
  whole is small (norms, biases) and listed."""
  mesh = AbstractMesh(sizes, sharding.PRESETS[preset])
  replicated = sharding.check_layout(params_8b, mesh)
  assert all(b <= sharding.REPLICATE_LIMIT_BYTES for _, b in replicated)
  total = sum(3 * math.prod(v.shape) * 4 for v in _leaves(params_8b))
  ideal = total / (sizes[1] * sizes[2])
  got = per_device_state_bytes(params_8b, mesh)
  print(f"{preset} {sizes}: {got / 2 ** 30:.2f} GiB a device, ideal {ideal / 2 ** 30:.2f} GiB; "
        f"{len(replicated)} small parameters whole ({sum(b for _, b in replicated) / 2 ** 20:.1f} MiB)")
  assert ideal <= got <= 1.1 * ideal
