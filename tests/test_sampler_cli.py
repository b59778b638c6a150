"""Text-level generation (template, stop strings, suffix, decoding), the CLI with its live view and
HTML trace, and the Monte-Carlo ELBO, with the demo tokenizer on a tiny random model."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from lladav_jax import config, generate as cli
from lladav_jax.data import template
from lladav_jax.data.demo_data import ensure_demo_data
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.inference import SamplingParams, elbo as elbo_lib, generation
from tests.models import random_model


@pytest.fixture(scope="module")
def tmodel(tmp_path_factory):
  paths = ensure_demo_data(str(tmp_path_factory.mktemp("demo")), num_train=4, num_val=1, num_test=1)
  tok = Tokenizer.from_dir(paths["tokenizer_dir"])
  return random_model(config.tiny(vocab_size=tok.vocab_size, mask_token_id=tok.mask_id), 1, {"lm_head": 30.0},
                      tokenizer=tok)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
  path = tmp_path_factory.mktemp("img") / "x.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), np.uint8)).save(path)
  return str(path)


KW = dict(gen_length=16, block_length=8, steps=8)


def test_generate_text_api(tmodel, image):
  tok = tmodel.tokenizer
  img = Image.open(image)
  outs = tmodel.generate(["What color is the circle?", "How many shapes are there?"], [[img], []],
                         SamplingParams(**KW, suffix=" done", stop=("\n",)), return_trajectory=True, batch_size=1,
                         tiles=2)
  suffix_ids = tok.encode(" done")
  for o in outs:
    assert o.token_ids[-len(suffix_ids):] == suffix_ids
    assert o.text == tok.decode(o.token_ids, skip_special=True)
    t = o.trajectory
    assert len(t.tokens) == 16 and len(t.commit_step) == 16
    assert o.token_ids[:-len(suffix_ids)] == t.tokens[:t.stop]
    assert tok.eos_id not in t.tokens and tok.bos_id not in t.tokens  # banned from the tokenizer
  # the same prompt ids through generate_ids (template applied as the original's eval does)
  ids = template.inference_prompt_ids(tok, "How many shapes are there?", 0)
  st = SamplingParams(**KW, seed=1).for_model(tmodel)  # prompt 1 of the call above: seed 0 + 1
  again = generation.generate_ids(tmodel, [ids], params=st, stop_ids=tok.encode_stop_strings(["\n"]),
                                  suffix_ids=suffix_ids, tiles=2)
  assert again[0].token_ids == outs[1].token_ids


def test_cli_json_trace_and_live_view(tmodel, image, tmp_path):
  trace = tmp_path / "t.html"
  buf = io.StringIO()
  res = cli.main(["--image", image, "--prompt", "What shape is the red object?", "--gen_length", "16",
                  "--block_length", "8", "--steps", "8", "--json", "--trace", str(trace)], model=tmodel, out=buf)
  rec = json.loads(buf.getvalue())
  assert rec["text"] == res.text and rec["nfe"] == res.nfe == 8 and len(rec["commit_step"]) == 16
  page = trace.read_text()
  assert page.startswith("<!DOCTYPE html>") and 'type="range"' in page and "<table>" in page
  assert "http" not in page.split("<body>")[1]  # self-contained

  class TTY(io.StringIO):
    def isatty(self):
      return True
  tty = TTY()
  cli.main(["--image", image, "--prompt", "What shape is the red object?", "--gen_length", "16",
            "--block_length", "8", "--steps", "8", "--fps", "1000"], model=tmodel, out=tty)
  shown = tty.getvalue()
  assert shown.count("step ") == 8 and "\x1b[" in shown and cli.MASK_GLYPH in shown
  assert res.text in shown


def test_elbo(tmodel, image):
  img = Image.open(image)
  a = tmodel.elbo(["What color is the circle?"], [[img]], ["red"], num_samples=8, seed=0, group=4)
  b = tmodel.elbo(["What color is the circle?"], [[img]], ["red"], num_samples=8, seed=0, group=4)
  assert a == b and np.isfinite(a[0]) and a[0] < 0
  # the estimator against a direct computation with the same masks through LLaDAV.logits
  tok = tmodel.tokenizer
  ids = template.inference_prompt_ids(tok, "What color is the circle?", 1)
  ans = tok.encode(" red circle")
  est = elbo_lib.elbo_ids(tmodel, ids, [img], ans, num_samples=4, seed=3, group=4)
  masks, ps = elbo_lib.mc_masks(len(ans), 4, np.random.default_rng(3), 4)
  assert masks.sum(1).tolist() == [round(p * len(ans)) for p in ps]
  total = 0.0
  for m, p in zip(masks, ps):
    noisy = np.where(m, tmodel.cfg.mask_token_id, ans)
    logits = tmodel.logits([ids + noisy.tolist()], images=[[img]])[0, -len(ans):].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    total += -logp[np.arange(len(ans)), ans][m].sum() / p
  np.testing.assert_allclose(est, -total / 4, rtol=1e-4)


def test_elbo_of_a_request_is_the_same_alone_or_batched(tmodel):
  """A request's Monte-Carlo noise depends on its own ids and the seed, never on its batch or place in it:
  through LLaDAV.elbo and the lmms-eval plugin's loglikelihood (float32 tiny model: exactly equal)."""
  from types import SimpleNamespace
  from lladav_jax.eval import lmms_plugin
  qs, ans = ["What color is the circle?", "How many shapes are there?", "Name it."], ["red", "two red shapes and a blue circle", " a"]
  kw = dict(num_samples=8, seed=5, group=4)
  alone = [tmodel.elbo([q], None, [a], **kw)[0] for q, a in zip(qs, ans)]
  order = [2, 0, 1]
  batched = tmodel.elbo([qs[i] for i in order], None, [ans[i] for i in order], **kw)
  assert [batched[order.index(k)] for k in range(3)] == alone
  assert tmodel.elbo(qs[1:2], None, ans[1:2], **{**kw, "seed": 6})[0] != alone[1]  # the seed still draws the noise
  lm = lmms_plugin.LLaDAVJax(model=tmodel, mc_num=8, batch_size=2, seed=5)
  lm.task_dict = {"t": {"test": {0: {}}}}
  reqs = [SimpleNamespace(args=(q, a, lambda d: [], 0, "t", "test")) for q, a in zip(qs, ans)]
  one = lm.loglikelihood(reqs[:1])
  assert lm.loglikelihood([reqs[i] for i in order])[order.index(0)] == one[0]
