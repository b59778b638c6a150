"""Sequence packing: the packed row layout (segments, positions, tiles, merge plans), the packed loss and
gradients equal to the unpacked ones (config.tiny, the released 384 / 14 geometry, anyres images), and the
pipeline's greedy first-fit packing (static shapes, fill, exact resume)."""
import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from lladav_jax import batch as batch_lib, config, multimodal as mm, sharding
from lladav_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lladav_jax.training import loss as L, state as st, step as stp
from tests.models import host_params
from tests.train_helpers import optim_cfg

CFG = mm.ImageConfig(image_size=384, patch_size=14)  # config.tiny's geometry (the released one)
P = CFG.tokens_per_tile


def _sample(rng, n_text, sizes=()):
  """One conversation: an image placeholder per size, then text; the last half of the text labelled."""
  imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
  ids = [IMAGE_TOKEN_INDEX] * len(imgs) + list(rng.integers(1, 400, n_text))
  labels = [IGNORE_INDEX] * (len(ids) - n_text // 2) + ids[len(ids) - n_text // 2:]
  return mm.expand(ids, mm.process_sample_images(imgs, CFG), CFG, labels=labels)


def test_collate_packs_segments_positions_tiles_and_plans():
  rng = np.random.default_rng(0)
  a, b = _sample(rng, 6, [(400, 300)]), _sample(rng, 5, [(300, 380)])
  ta, tb = a.pixels.shape[0], b.pixels.shape[0]
  assert ta > 1 and tb > 1  # anyres: several tiles each
  n = len(a.tokens) + len(b.tokens)
  x = batch_lib.collate_train([[a, b]], CFG, length=n + 7, tiles=ta + tb + 2)
  x, labels = x.inputs, x.labels[0]
  seg = x.segments[0]
  np.testing.assert_array_equal(seg, [1] * len(a.tokens) + [2] * len(b.tokens) + [0] * 7)
  np.testing.assert_array_equal(x.positions[0, :n], np.r_[np.arange(len(a.tokens)), np.arange(len(b.tokens))])
  np.testing.assert_array_equal(x.pixels[0, :ta], a.pixels)
  np.testing.assert_array_equal(x.pixels[0, ta:ta + tb], b.pixels)
  assert not x.pixels[0, ta + tb:].any()
  np.testing.assert_array_equal(labels[:n], np.r_[a.labels, b.labels])
  assert (labels[n:] == IGNORE_INDEX).all()
  # b's plan: its tile features shifted past a's tiles, its newline / zero entries at the row's
  tiles = ta + tb + 2
  ib, wb = x.merge_idx[0, len(a.tokens):n], x.merge_w[0, len(a.tokens):n]
  own = b.merge_idx < tb * P
  np.testing.assert_array_equal(ib[own], b.merge_idx[own] + ta * P)
  np.testing.assert_array_equal(ib[b.merge_idx == tb * P], tiles * P)
  np.testing.assert_array_equal(ib[b.merge_idx == tb * P + 1], tiles * P + 1)
  np.testing.assert_array_equal(wb, b.merge_w)
  # the same features through either table: splice a random per-tile table both ways
  feats = rng.standard_normal((tiles * P + 2, 3))
  own_tab = np.concatenate([feats[ta * P:(ta + tb) * P], feats[tiles * P:]])
  np.testing.assert_allclose((feats[ib] * wb[..., None]).sum(-2), (own_tab[b.merge_idx] * b.merge_w[..., None]).sum(-2))


@pytest.fixture(scope="module")
def tiny_setup():
  cfg = config.tiny()
  setup = st.make_setup(cfg, sharding.make_mesh(devices=jax.devices()[:1]), optim_cfg(), 10)
  return setup, st.init_state(setup, seed=3, params=host_params(setup))


def _loss_and_grad(fn, state, batch):
  return jax.device_get(fn(state, jax.tree.map(jax.numpy.asarray, batch)))


def test_packed_loss_and_gradients_equal_unpacked(tiny_setup):
  """Three conversations (two with anyres images, one text only) one a row, and packed two rows (plus an
  all-padding row): the same noise per conversation number, the same loss and gradients (float32, 1e-5)."""
  setup, state = tiny_setup
  rng = np.random.default_rng(1)
  s = [_sample(rng, 40, [(300, 200)]), _sample(rng, 30), _sample(rng, 24, [(200, 300)])]  # anyres: 2 tiles each
  tiles = sum(e.pixels.shape[0] for e in s)
  length = sum(len(e.tokens) for e in s)
  unpacked = batch_lib.collate_train(s, CFG, tiles=tiles, length=length)
  packed = batch_lib.collate_train([s[:2], s[2:]], CFG, rows=3, tiles=tiles, length=length)
  assert packed.inputs.segments[0].max() == 2 and not packed.inputs.segments[2].any()
  # one jit for the three batches (the same shapes: 3 rows, `tiles`, `length`): one compile
  fn = jax.jit(stp.make_loss_and_grad(setup, L.LossConfig(logits_chunk=256), accum=1))
  lu, au, gu = _loss_and_grad(fn, state, unpacked)
  lp, ap, gp = _loss_and_grad(fn, state, packed)
  assert au["masked_tokens"] > 0 and au["masked_tokens"] == ap["masked_tokens"]  # the same positions masked
  assert au["answer_tokens"] == ap["answer_tokens"] and au["conversations"] == ap["conversations"] == 3
  np.testing.assert_allclose(lp, lu, rtol=1e-5)
  fu, fp = traverse_util.flatten_dict(gu), traverse_util.flatten_dict(gp)
  assert fu.keys() == fp.keys()
  for k in fu:
    scale = np.abs(fu[k]).max()
    if k[-1] != "k_bias":  # softmax ignores a key bias: its gradient is float32 noise around zero
      assert scale > 1e-8, k  # every other parameter gets a gradient (the vision tower's included)
    np.testing.assert_allclose(fp[k], fu[k], rtol=1e-5, atol=1e-5 * max(scale, 1e-6), err_msg="/".join(k))
  # the mean is over conversations, not rows: all three in one row give the same loss
  one_row = batch_lib.collate_train([s], CFG, rows=3, tiles=tiles, length=length)  # plus two all-padding rows
  assert one_row.inputs.segments[0].max() == 3 and not one_row.inputs.segments[1:].any()
  lp2, _, _ = _loss_and_grad(fn, state, one_row)
  np.testing.assert_allclose(lp2, lu, rtol=1e-5)


def test_noise_is_per_conversation_not_per_row():
  seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]], np.int32)
  pos = np.array([[0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]], np.int32)
  conv, count = L.conversations(seg)
  np.testing.assert_array_equal(conv, [[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, -1, -1]])
  assert int(count) == 3
  t, u = L.draw_noise(jax.random.key(0), seg, pos)
  t, u = np.asarray(t), np.asarray(u)
  assert t[0, 0] == t[0, 1] and t[0, 2] == t[0, 4] and t[0, 0] != t[0, 2]
  # unpacked: conversation 1 alone in row 1 (number 1) draws the same t and u at the same positions
  t1, u1 = L.draw_noise(jax.random.key(0), np.array([[1, 1, 0], [1, 1, 1]], np.int32),
                        np.array([[0, 1, 2], [0, 1, 2]], np.int32))
  assert np.asarray(t1)[1, 0] == t[0, 2]
  np.testing.assert_array_equal(np.asarray(u1)[1], u[0, 2:5])


# ----------------------------------------------------------------------------- the pipeline's packing

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  from lladav_jax.data.demo_data import ensure_demo_data
  return ensure_demo_data(str(tmp_path_factory.getbasetemp() / "demo"), num_train=48, num_val=8, num_test=8)


def _train_it(demo, **kw):
  from lladav_jax.data import pipeline
  from lladav_jax.data.demo_data import demo_data_config, demo_image_config
  from lladav_jax.data.tokenizer import Tokenizer
  cfg = demo_data_config(demo).replace(**kw)
  it = pipeline.build_train_iterator(cfg, Tokenizer.from_dir(demo["tokenizer_dir"]), demo_image_config(),
                                     batch_size_per_process=2, process_index=0, process_count=1, seed=1)
  return cfg, it


def test_pipeline_packs_first_fit_and_resumes_exactly(demo):
  import json
  from lladav_jax.data import pipeline
  from tests.train_helpers import flat
  cfg, it = _train_it(demo, packing=True, seq_len=320, buckets=(320,), tile_budget=8)
  _, plain = _train_it(demo)
  order = [i for _ in range(20) for i in (next(plain), plain.last_ids)[1]]  # the unpacked stream's order
  got = []
  for _ in range(3):
    b = flat(next(it))
    seg = b["segments"]
    # static shapes: the tokens' bucket, and one of the tile buckets up to the budget (pipeline.tile_buckets)
    assert b["tokens"].shape == (2, 320) and b["pixels"].shape[0] == 2
    assert b["pixels"].shape[1] in pipeline.tile_buckets(cfg)
    assert (seg.max(axis=1) >= 2).all()  # several conversations a row
    for r in range(2):  # segments 1..k, contiguous, positions restarting, each opening with BOS
      k = seg[r].max()
      starts = [int(np.argmax(seg[r] == j)) for j in range(1, k + 1)]
      assert starts == sorted(starts) and (b["positions"][r, starts] == 0).all()
      assert (b["tokens"][r, starts] == b["tokens"][0, 0]).all()
      assert ((b["merge_idx"][r] <= b["pixels"].shape[1] * 16 + 1)).all()
    got += it.last_ids
  # the same records in the same order as unpacked, rows filled first-fit: no record lost or repeated
  assert sorted(got) == sorted(order[:len(got)]) and len(set(got)) == len(got)
  state = json.loads(json.dumps(it.get_state()))  # a sample is held for the next batch: read again on restore
  assert it._pending is not None
  want = [flat(next(it)) for _ in range(2)]
  _, it2 = _train_it(demo, packing=True, seq_len=320, buckets=(320,), tile_budget=8)
  it2.set_state(state)
  for w in want:
    g = flat(next(it2))
    assert all(np.array_equal(w[k], g[k]) for k in w)


def test_packing_is_a_checked_field():
  from lladav_jax.data import pipeline
  assert any("data.packing" in e for e in pipeline.config_problems(pipeline.DataConfig(packing="yes")))
