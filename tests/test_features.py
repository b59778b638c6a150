"""The engine's image features (`inference/features.py`): the tower's features laid out for an engine's tile
slots give the same prompt embeddings as the whole forward from pixels, the cache returns a tile's features
without running the tower again, and stays within its bytes."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lladav_jax.inference import prompts as prompt_lib
from lladav_jax.inference.features import TileFeatures
from lladav_jax.inference.params import SamplingParams
from tests.test_sampler import IMAGES, PROMPTS, model  # noqa: F401


def _request(model, k):
  inp = prompt_lib.prepare_inputs(model, [PROMPTS[k]], [IMAGES[k]], seeds=[0], rows=1)
  return inp, prompt_lib.requests(inp, SamplingParams(gen_length=8, block_length=8, steps=8).row_params(8, 8), 0)[0]


def test_features_in_more_tile_slots_embed_as_the_pixels_do(model):
  m = nnx.merge(model.graphdef, model.state)
  for k in (1, 2):  # one image (anyres: several tiles), two images
    inp, req = _request(model, k)
    have = inp.prompt.pixels.shape[1]
    want = m.embed(*(jnp.asarray(getattr(inp.prompt, f)) for f in ("tokens", "pixels", "merge_idx", "merge_w")))
    got_req = TileFeatures(model).attach(req, have + 3)  # three more tile slots than the prompt's bucket
    assert got_req.prompt.pixels is None and got_req.features.shape[0] == (have + 3) * model.image_cfg.tokens_per_tile
    pr = got_req.prompt
    got = m.embed_table(jnp.asarray(pr.tokens)[None], m.feature_table(jnp.asarray(got_req.features)[None]),
                        jnp.asarray(pr.merge_idx)[None], jnp.asarray(pr.merge_w)[None])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_the_cache_hits_by_tile_bytes_and_keeps_within_its_bytes(model):
  _, req = _request(model, 2)
  tiles = req.prompt.pixels.shape[0]
  feats = TileFeatures(model, max_bytes=1 << 30)
  first = feats.attach(req, tiles)
  used = feats.misses
  assert used >= 2 and feats.hits == 0 and feats.bytes > 0
  again = feats.attach(req, tiles)  # the same bytes: no tower, the same features
  assert feats.misses == used and feats.hits == used
  np.testing.assert_array_equal(again.features, first.features)
  one_tile = feats.bytes // used
  small = TileFeatures(model, max_bytes=one_tile)  # room for one tile's features
  small.attach(req, tiles)
  assert small.bytes <= one_tile and len(small.cache) == 1
  small.attach(req, tiles)
  assert small.hits <= 1 and small.misses >= 2 * used - 1
  assert TileFeatures(model).attach(req, tiles).features.shape == first.features.shape  # no cache: still works
