"""LoRA on the LLM: the adapted model starts as its base, only adapters (+ groups left trainable) are optimised
and checkpointed, a resume reloads and checks the base, the merged export has the adapted model's logits,
and the adapters shard under FSDP."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec as P

from configs import finetune
from lladav_jax import config, convert, sharding, weights
from lladav_jax.api import LLaDAV
from lladav_jax.model import abstract_model
from lladav_jax.training import checkpointing, loss as L, optimizer, run_config, state as st, step as stp, synthetic
from tests.models import host_params
from tests.train_helpers import optim_cfg

LORA = config.LoraConfig(rank=4, alpha=8.0, dropout=0.5)


def _cfg(lora=LORA):
  return config.tiny(lora=lora)


def _batch(seed=0):
  return synthetic.make_batch(np.random.default_rng(seed), batch=8, seq_len=32, vocab_size=512, mask_token_id=500)


def _global(batch, mesh):
  return jax.tree.map(lambda v: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)), batch)


def _flat(tree):
  return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _lora_params(base_params, lora_setup, seed=1, b_scale=0.0):
  """The base model's parameters plus adapters: A random, B = b_scale * N(0, 1)."""
  rng = np.random.default_rng(seed)
  full = _flat(st.full_params(lora_setup.abstract))
  out = dict(_flat(base_params))
  for k, v in full.items():
    if k not in out:
      assert optimizer.group_of(k.split(".")) == "lora", k
      x = rng.standard_normal(v.shape).astype(np.float32)
      out[k] = x * (0.1 if k.endswith(".a") else b_scale)
  return weights.nest(out)


def _loss(setup, state, batch, accum=1):
  fn = stp.make_loss_and_grad(setup, L.LossConfig(logits_chunk=8), accum=accum)
  rep = sharding.replicated(setup.mesh)
  f = jax.jit(fn, in_shardings=(setup.shardings, stp.batch_shardings(setup.mesh, batch)),
              out_shardings=(rep, rep, setup.shardings["params"]))
  return jax.device_get(f(state, _global(batch, setup.mesh)))


def test_adapted_model_starts_exactly_at_its_base():
  """B = 0: the loss equals the base model's bit for bit (dropout on, 8 fake devices, 2 micro-batches); the
  first gradient reaches B only (A's gradient goes through B = 0)."""
  mesh = sharding.make_mesh(2, 2, 2)
  base = st.make_setup(_cfg(config.LoraConfig()), mesh, optim_cfg(("projector", "llm")), total_steps=10)
  lora = st.make_setup(_cfg(), mesh, optim_cfg(("lora", "projector")), total_steps=10)
  params = host_params(base)
  batch = _batch()
  l0, _, _ = _loss(base, st.init_state(base, seed=0, params=params), batch, accum=2)
  l1, _, g1 = _loss(lora, st.init_state(lora, seed=0, params=_lora_params(params, lora)), batch, accum=2)
  assert float(l1) == float(l0)
  g = _flat(g1)
  assert any(np.abs(v).max() > 0 for k, v in g.items() if k.endswith(".b"))
  assert all(np.abs(v).max() == 0 for k, v in g.items() if k.endswith(".a"))


def test_only_adapters_and_projector_are_trained_and_sharded():
  mesh = sharding.make_mesh(2, 2, 2)
  setup = st.make_setup(_cfg(), mesh, optim_cfg(("lora", "projector")), total_steps=10)
  names = _flat(setup.abstract["params"])
  assert {optimizer.group_of(k.split(".")) for k in names} == {"lora", "projector"}
  assert len([k for k in names if "_lora." in k]) == 14  # a and b of q, k, v, o, gate, up, down
  assert not any("_lora" in k for k in _flat(setup.abstract["frozen"]))
  # the optimizer state: Adam's mu and nu of the trainable parameters, nothing for the frozen base
  shapes = sorted(tuple(a.shape) for a in jax.tree.leaves(setup.abstract["params"]))
  assert sorted(tuple(a.shape) for a in jax.tree.leaves(setup.abstract["opt_state"]) if a.shape) == sorted(shapes * 2)
  # adapters carry the weight's logical axes (A: the input side, B: the output side; the rank replicated) and,
  # like every weight, use each weight axis: no device holds a whole adapter, under fsdp_tp and pure fsdp
  specs = {k: v.sharding.spec for k, v in names.items()}
  assert specs["llm.layers.attn.q_lora.a"] == P(None, ("fsdp", "tensor"), None)
  assert specs["llm.layers.attn.q_lora.b"] == P(None, None, "tensor", "fsdp")
  fsdp = sharding.make_mesh(1, 4, 2, preset="fsdp")
  fsdp_specs = {k: v.sharding.spec for k, v in _flat(st.make_setup(
      _cfg(), fsdp, optim_cfg(("lora", "projector")), total_steps=10).abstract["params"]).items()}
  for m, sp in ((mesh, specs), (fsdp, fsdp_specs)):
    for k, spec in sp.items():
      if "_lora." in k:
        used = {n for s_ in spec if s_ for n in (s_ if isinstance(s_, tuple) else (s_,))}
        assert used == set(m.axis_names) - {"data"}, (k, spec)
        assert spec[0] is None and spec[-1 if k.endswith(".a") else 1] is None  # layers and rank unsharded
  # two compiled steps move the adapters and projector; the base stays bit-identical
  state = st.init_state(setup, seed=0, params=_lora_params(host_params(
      st.make_setup(_cfg(config.LoraConfig()), mesh, optim_cfg(), total_steps=10)), setup))
  before = jax.device_get(state)
  batch = _batch(1)
  compiled, _ = stp.compile_train_step(setup, L.LossConfig(logits_chunk=0), accum=1,
                                       batch_shapes=jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), batch))
  for _ in range(2):
    state, m = compiled(state, _global(batch, mesh))
  after = jax.device_get(state)
  assert float(m["finite"]) == 1.0
  for k, v in _flat(before["frozen"]).items():
    np.testing.assert_array_equal(_flat(after["frozen"])[k], v, err_msg=k)
  for k, v in _flat(before["params"]).items():
    assert not np.array_equal(_flat(after["params"])[k], v), k


def _saved_keys(path):
  import orbax.checkpoint as ocp
  from etils import epath
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(str(path)))
  tree = getattr(meta, "tree", meta)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {jax.tree_util.keystr(p) for p, _ in leaves}


@pytest.mark.slow  # ~90 s on 2 cores; the CI budget (the default run keeps init, sharding and merge)
def test_checkpoint_leaves_out_the_base_and_resumes_exactly(tmp_path):
  """The train checkpoint holds step, rng, adapters + projector, their optimizer state and the base's digest;
  a restore reloads the base from the seeded init, and the next step equals the uninterrupted run's. Another
  base (another seed) is refused."""
  mesh = sharding.make_mesh(2, 2, 2)
  setup = st.make_setup(_cfg(), mesh, optim_cfg(("lora", "projector")), total_steps=10)
  state = st.init_state(setup, seed=3)
  batch = _batch(2)
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), batch)
  compiled, _ = stp.compile_train_step(setup, L.LossConfig(logits_chunk=0), accum=1, batch_shapes=shapes)
  state, _ = compiled(state, _global(batch, mesh))
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=2, async_save=False)
  it = synthetic.SyntheticIterator(batch=2, seq_len=32, vocab_size=512, mask_token_id=500)
  assert ck.save(1, st.checkpoint_tree(setup, state), it, force=True)
  ck.wait()
  on_disk = _saved_keys(tmp_path / "ck" / "1" / "state")
  assert not any(k.startswith("['frozen']") for k in on_disk) and "['frozen_digest']" in on_disk
  assert "['params']['llm']['layers']['attn']['q_lora']['a']" in on_disk
  assert not any("q_proj" in k or "['vision']" in k for k in on_disk)  # no base weight, no optimizer state of one
  saved, _ = ck.restore(1, st.checkpoint_abstract(setup), it)
  resumed = st.from_checkpoint(setup, saved, seed=3)
  ref = jax.tree_util.tree_flatten_with_path(jax.device_get(state))
  got = jax.tree_util.tree_flatten_with_path(jax.device_get(resumed))
  assert ref[1] == got[1]  # the same tree: frozen base back in place
  for (k, x), (_, y) in zip(ref[0], got[0]):
    np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(k))
  a, ma = compiled(state, _global(batch, mesh))
  b, mb = compiled(resumed, _global(batch, mesh))
  assert float(ma["loss"]) == float(mb["loss"])
  for x, y in zip(jax.tree.leaves(jax.device_get(a["params"])), jax.tree.leaves(jax.device_get(b["params"]))):
    np.testing.assert_array_equal(x, y)
  saved, _ = ck.restore(1, st.checkpoint_abstract(setup), it)
  with pytest.raises(st.BaseMismatchError, match="seed=4"):
    st.from_checkpoint(setup, saved, seed=4)
  ck.close()


def test_merged_export_has_the_adapted_logits(tmp_path):
  """save_model folds B A into W (config without adapters); its logits, and those of its HF export
  (convert orbax-to-hf), equal the adapted model's within 1e-5 in float32. Dropout is off at inference."""
  cfg = _cfg()
  base_cfg = cfg.replace(lora=config.LoraConfig())
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  setup = st.make_setup(cfg, mesh, optim_cfg(("lora", "projector")), total_steps=10)
  params = _lora_params(host_params(st.make_setup(base_cfg, mesh, optim_cfg(), total_steps=10)), setup, b_scale=0.3)
  graphdef, _ = abstract_model(cfg)
  adapted = LLaDAV(cfg, graphdef, nnx.State(jax.tree.map(jnp.asarray, params)), mesh=mesh)
  ids = [np.random.default_rng(0).integers(0, 499, 24)]
  want = adapted.logits(ids)
  base = LLaDAV(base_cfg, abstract_model(base_cfg)[0],
                nnx.State(weights.nest({k: jnp.asarray(v) for k, v in _flat(params).items() if "_lora" not in k})),
                mesh=mesh)
  assert np.abs(base.logits(ids) - want).max() > 1e-3  # the adapters change the model

  out = weights.save_model(str(tmp_path / "model"), cfg, params)
  assert weights.load_model_config(out).lora == config.LoraConfig()
  assert not any("_lora" in k for k in weights.orbax_metadata(out))
  merged = LLaDAV.from_pretrained(out)
  np.testing.assert_allclose(merged.logits(ids), want, atol=1e-5, rtol=0)

  hf = convert.orbax_to_hf(out, str(tmp_path / "hf"))
  state = weights.load_state(hf, base_cfg, mesh)
  np.testing.assert_allclose(LLaDAV(base_cfg, abstract_model(base_cfg)[0], state, mesh=mesh).logits(ids), want,
                             atol=1e-5, rtol=0)


@pytest.mark.slow  # ~40 s on 2 cores; the CI budget
def test_dropout_acts_in_training_only():
  """With B != 0, a dropout key changes the hidden states (each layer and projection its own mask); without
  one (inference) the output is deterministic."""
  from lladav_jax.model.lladav import LLaDAVModel
  graphdef, state = nnx.split(LLaDAVModel(_cfg(), rngs=nnx.Rngs(0)))
  flat = {k: (np.full(v.shape, 0.05, np.float32) if k.endswith("_lora.b") else v)
          for k, v in _flat(nnx.to_pure_dict(state)).items()}
  nnx.replace_by_pure_dict(state, weights.nest(flat))
  m = nnx.merge(graphdef, state)
  x = jax.random.normal(jax.random.key(0), (2, 8, 64))
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  h = m.llm(x, pos)
  np.testing.assert_array_equal(h, m.llm(x, pos))
  h1, h2 = m.llm(x, pos, dropout_key=jax.random.key(1)), m.llm(x, pos, dropout_key=jax.random.key(2))
  assert np.abs(h1 - h).max() > 1e-4 and np.abs(h1 - h2).max() > 1e-4
  np.testing.assert_array_equal(h1, m.llm(x, pos, dropout_key=jax.random.key(1)))


def test_config_names_the_lora_fields():
  assert finetune.LORA_TARGETS == config.LORA_TARGETS
  r = run_config.resolve(finetune.get_config("lora,runlocal"), num_devices=8, process_count=1)
  assert r.model.lora == config.LoraConfig(rank=64, alpha=16.0, dropout=0.05) and r.optim.trainable == ("lora", "projector")
  bad = [("model.lora.rank=-1", "model.lora.rank=-1"), ("model.lora.dropout=1.0", "model.lora.dropout=1.0"),
         ("model.lora.targets=('q_proj','lm_head')", "model.lora.targets"),
         ("optim.trainable=('llm','lora')", "drop 'llm'"), ("optim.trainable=('projector',)", "does not train them"),
         ("model.lora.rank=0", "has 'lora' but model.lora.rank=0")]
  for override, field in bad:
    with pytest.raises(run_config.ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
      run_config.resolve(finetune.get_config(f"lora,runlocal,{override}"), num_devices=8, process_count=1)
