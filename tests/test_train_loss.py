"""The masked-diffusion loss against a NumPy transcription of the original's formula, and the
chunked LM-head cross-entropy against the unchunked one (values and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lladav_jax import config, sharding
from lladav_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lladav_jax.training import loss as L
from lladav_jax.training import state as st
from lladav_jax.training import synthetic
from tests.models import host_params
from tests.train_helpers import flat, optim_cfg


def _batch(b=4, l=48, seed=0):
  return synthetic.make_batch(np.random.default_rng(seed), batch=b, seq_len=l, vocab_size=512, mask_token_id=500,
                              tiles=1, answer_frac=0.4)


def numpy_loss(logits, tokens, labels, valid, t, u, eps=1e-3):
  """The original's objective (docs/ORIGINAL.md, "Training objective"), literally: loop over sequences and
  masked positions."""
  b = tokens.shape[0]
  total = 0.0
  for i in range(b):
    p = (1 - eps) * t[i, 0] + eps  # one t a sequence
    ans = [j for j in range(tokens.shape[1]) if labels[i, j] != IGNORE_INDEX and valid[i, j]]
    s = 0.0
    for j in ans:
      if u[i, j] < p:
        lg = logits[i, j].astype(np.float64)
        lse = np.log(np.sum(np.exp(lg - lg.max()))) + lg.max()
        s += (lse - lg[labels[i, j]]) / p
    total += s / max(len(ans), 1)
  return total / b


def test_corrupt_masks_only_labelled_text():
  bt = flat(_batch())
  t, u = L.draw_noise(jax.random.key(0), jnp.asarray(bt["segments"]), jnp.asarray(bt["positions"]))
  noisy, masked, p, w = jax.jit(L.corrupt, static_argnums=(5, 6))(jnp.asarray(bt["tokens"]), jnp.asarray(bt["labels"]), jnp.asarray(bt["segments"]),
                                  t, u, 500, 1e-3)
  masked = np.asarray(masked)
  assert masked.any()
  assert not (masked & (bt["labels"] == IGNORE_INDEX)).any()
  assert not (masked & (bt["segments"] == 0)).any()
  assert not (masked & (bt["tokens"] == IMAGE_TOKEN_INDEX)).any()
  noisy = np.asarray(noisy)
  np.testing.assert_array_equal(noisy[masked], 500)
  np.testing.assert_array_equal(noisy[~masked], bt["tokens"][~masked])
  # image positions are untouched, so swapping ids before embedding == swapping embeddings after the splice
  np.testing.assert_array_equal(noisy == IMAGE_TOKEN_INDEX, bt["tokens"] == IMAGE_TOKEN_INDEX)


def test_antithetic_times_cover_unit_interval():
  seg = jnp.ones((8, 4), jnp.int32)
  t, _ = L.draw_noise(jax.random.key(3), seg, jnp.broadcast_to(jnp.arange(4), (8, 4)), antithetic=True)
  t = np.asarray(t)
  assert (t == t[:, :1]).all()  # one t a conversation
  t = np.sort(t[:, 0])
  np.testing.assert_allclose(np.diff(t), 1 / 8, atol=1e-6)


def test_loss_matches_numpy_formula():
  cfg = config.tiny()
  setup = st.make_setup(cfg, sharding.make_mesh(devices=jax.devices()[:1]), optim_cfg(), 10)
  graphdef, params = setup.graphdef, nnx.State(host_params(setup))
  batch = _batch()
  bt = flat(batch)
  jb = {k: jnp.asarray(v) for k, v in bt.items()}
  t, u = L.draw_noise(jax.random.key(7), jb["segments"], jb["positions"])

  @jax.jit
  def both(params, batch, jb, t, u):
    model = nnx.merge(graphdef, params)
    loss, aux = L.diffusion_loss(model, batch, t, u, mask_token_id=cfg.mask_token_id,
                                 cfg=L.LossConfig(logits_chunk=16, padding_ids=(511,)), conversations=4)
    # the reference: replace masked embeddings *after* splicing the images, full float32 logits
    _, masked, _, _ = L.corrupt(jb["tokens"], jb["labels"], jb["segments"], t, u, cfg.mask_token_id, 1e-3)
    x = model.embed(jb["tokens"], jb["pixels"], jb["merge_idx"], jb["merge_w"])
    mask_emb = model.llm.embed_tokens(jnp.full((1, 1), cfg.mask_token_id))[0, 0]
    x = jnp.where(masked[..., None], mask_emb, x)
    logits = model.llm.logits(model.llm(x, jb["positions"], jb["segments"]))
    return loss, aux, masked, logits

  loss, aux, masked, logits = both(params, batch, jb, t, u)
  want = numpy_loss(np.asarray(logits), bt["tokens"], bt["labels"], bt["segments"] > 0, np.asarray(t), np.asarray(u))
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  assert float(aux["masked_tokens"]) == float(np.asarray(masked).sum())
  # the answer-word counts: masked positions whose label is not the EOS padding (synthetic's eos: 511)
  masked, lab = np.asarray(masked), bt["labels"]
  words = masked & (lab != 511)
  assert 0 < words.sum() <= masked.sum() and (lab == 511).any()
  right = np.asarray(logits).argmax(-1) == lab
  assert float(aux["answer_masked"]) == words.sum()
  assert float(aux["answer_correct"]) == (right & words).sum()
  assert float(aux["correct"]) == (right & masked).sum()


@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_ce_equals_unchunked(chunk):
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((3, 40, 16)), jnp.float32)
  head = jnp.asarray(rng.standard_normal((16, 50)) * 0.3, jnp.float32)
  labels = jnp.asarray(rng.integers(-1, 50, (3, 40)), jnp.int32).at[:, :3].set(IGNORE_INDEX)
  w = jnp.asarray(rng.random((3, 40)) * (rng.random((3, 40)) < 0.5), jnp.float32)
  f = lambda c: jax.jit(jax.value_and_grad(lambda h, head: L.weighted_ce(h, head, labels, w, chunk=c)[0],
                                            argnums=(0, 1)))
  full, full_g = f(0)(h, head)
  got, got_g = f(chunk)(h, head)
  np.testing.assert_allclose(got, full, rtol=1e-6)
  for a, b in zip(got_g, full_g):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # sums in another order: float32 rounding (~1e-7)
  # and against a direct float32 log-softmax
  logits = np.asarray(h) @ np.asarray(head)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  lab = np.where(np.asarray(labels) < 0, 0, np.asarray(labels))
  ce = lse - np.take_along_axis(logits, lab[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(full), float((ce * np.asarray(w)).sum()), rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 8])
def test_answer_accuracy_leaves_padding_ids_out(chunk):
  """The metric counts (#right over weights > 0; the same over labels that are not padding) against NumPy's
  argmax, on a batch where the padding labels are all right and the answer words half: the count with padding
  is the easy one, the one without it the answer's."""
  rng = np.random.default_rng(4)
  v, pad = 24, (20, 21)  # e.g. the demo tokenizer's EOS and <|eot_id|>
  labels = rng.integers(0, 20, (3, 30))
  labels[:, 18:] = rng.choice(pad, (3, 12))  # a short answer, then <|eot_id|> / EOS padding
  labels[:, :4] = IGNORE_INDEX  # the prompt
  # the logits' argmax: the label at every padding position and at half the answer words, another id elsewhere
  target = np.where((labels >= 20) | (rng.random(labels.shape) < 0.5), labels, (labels + 1) % 20)
  target = np.where(labels < 0, 0, target)
  h = rng.standard_normal((3, 30, v)) * 0.1 + 3.0 * np.eye(v)[target]
  head = np.eye(v) + rng.standard_normal((v, v)) * 0.01
  w = (rng.random((3, 30)) < 0.7) * (labels != IGNORE_INDEX) * rng.random((3, 30))
  got = jax.jit(lambda h, head: L.weighted_ce(h, head, jnp.asarray(labels, jnp.int32), jnp.asarray(w, jnp.float32),
                                              chunk=chunk, padding_ids=pad))(jnp.asarray(h, jnp.float32),
                                                                             jnp.asarray(head, jnp.float32))
  right = (h @ head).argmax(-1) == labels
  on = w > 0
  words = on & ~np.isin(labels, pad)
  assert float(got[2]) == (right & on).sum()
  assert float(got[3]) == (right & words).sum()
  acc_all, acc_words = (right & on).sum() / on.sum(), (right & words).sum() / words.sum()
  assert acc_all > 0.7 and acc_words < 0.7  # the premise: padding inflates the count that includes it
  # no padding ids: the same count as with padding
  none = jax.jit(lambda h, head: L.weighted_ce(h, head, jnp.asarray(labels, jnp.int32), jnp.asarray(w, jnp.float32),
                                               chunk=chunk))(jnp.asarray(h, jnp.float32), jnp.asarray(head, jnp.float32))
  assert float(none[3]) == float(none[2]) == float(got[2])


def test_head_matmuls_run_once_under_value_and_grad():
  """Under value_and_grad each chunk runs the head's three matmuls once (logits, d hidden, d head: the
  logits are neither kept nor recomputed for the backward), and the gradients, the weights' included, are
  NumPy's: d logits = w * (softmax - onehot), d w = CE, each times the loss's cotangent."""
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.standard_normal((2, 21, 16)), jnp.float32)
  head = jnp.asarray(rng.standard_normal((16, 40)) * 0.3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 40, (2, 21)), jnp.int32)
  w = jnp.asarray(rng.random((2, 21)) * (rng.random((2, 21)) < 0.6), jnp.float32)
  f = jax.jit(jax.value_and_grad(lambda h, head, w: 0.5 * L.weighted_ce(h, head, labels, w, chunk=8)[0],
                                 argnums=(0, 1, 2)))
  assert f.lower(h, head, w).as_text().count("dot_general") == 3  # in the chunk scan's body, once each
  val, (dh, dhead, dw) = f(h, head, w)
  logits = np.asarray(h, np.float64) @ np.asarray(head, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(40)[np.asarray(labels)]
  ce = -np.log((p * onehot).sum(-1))
  g = 0.5 * np.asarray(w)[..., None] * (p - onehot)
  np.testing.assert_allclose(float(val), 0.5 * (ce * np.asarray(w)).sum(), rtol=1e-6)
  np.testing.assert_allclose(dh, g @ np.asarray(head, np.float64).T, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(dhead, np.einsum("bld,blv->dv", np.asarray(h, np.float64), g), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dw, 0.5 * ce, rtol=1e-5)


def test_bf16_head_backward_takes_bf16_cotangent():
  """bfloat16 compute: float32 logits of bf16 operands forward; backward, the logits' cotangent is
  rounded to bf16 and both matmuls are bf16 x bf16 accumulated in float32 (the head's gradient gathers no f32
  copy of the head); the head's gradient reaches the float32 master weights in float32."""
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.standard_normal((2, 24, 16)), jnp.bfloat16)
  head = jnp.asarray(rng.standard_normal((16, 40)) * 0.3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 40, (2, 24)), jnp.int32)
  w = jnp.asarray(rng.random((2, 24)), jnp.float32)
  f = jax.jit(jax.value_and_grad(lambda h, head: L.weighted_ce(h, head, labels, w, chunk=8, dtype=jnp.bfloat16)[0],
                                 argnums=(0, 1)))
  val, (dh, dhead) = f(h, head)
  dots = [l.rsplit(":", 1)[-1].split("->")[0] for l in f.lower(h, head).as_text().splitlines() if "dot_general" in l]
  assert len(dots) >= 3 and all("f32" not in d for d in dots), dots  # every matmul takes bf16 operands
  assert dh.dtype == jnp.bfloat16 and dhead.dtype == jnp.float32
  hb, wb = h.astype(jnp.float32), head.astype(jnp.bfloat16).astype(jnp.float32)
  logits = jnp.einsum("BLD,DV->BLV", hb, wb)
  np.testing.assert_allclose(float(val), float(jnp.sum(w * (jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, labels[..., None], -1)[..., 0]))), rtol=1e-5)
  g = (jax.nn.softmax(logits, -1) - jax.nn.one_hot(labels, 40)) * w[..., None]
  g = g.astype(jnp.bfloat16).astype(jnp.float32)  # the cotangent in bf16
  np.testing.assert_allclose(np.asarray(dh, np.float32), np.asarray(jnp.einsum("BLV,DV->BLD", g, wb).astype(
      jnp.bfloat16), np.float32), rtol=1e-2, atol=1e-3)
  want = jnp.einsum("BLD,BLV->DV", hb, g)
  np.testing.assert_allclose(np.asarray(dhead), np.asarray(want), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("chunk", [0, 16])
def test_bf16_compute_takes_the_label_logit_from_float32_logits(chunk):
  """bf16 operands, float32 logits (f32 accumulation, no bf16 rounding of the logits): the label's logit and
  the log-sum-exp come from the same float32 logits, as the original's CE on `logits.float()`; under
  value_and_grad (the fused forward + backward) the value is the same."""
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.standard_normal((2, 40, 64)) * 2, jnp.bfloat16)
  head = jnp.asarray(rng.standard_normal((64, 300)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 300, (2, 40)), jnp.int32)
  w = jnp.ones((2, 40), jnp.float32)
  # float64 CE of the exactly-represented bf16 operands: logits of magnitude ~30, where a bf16 rounding of the
  # logits (8 bits of mantissa: steps of 0.125 to 0.25) would move each CE by ~0.1
  hb, wb = np.asarray(h, np.float64), np.asarray(head.astype(jnp.bfloat16), np.float64)
  logits = hb @ wb
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = lse - np.take_along_axis(logits, np.asarray(labels)[..., None], -1)[..., 0]
  got = jax.jit(lambda h, head: L.weighted_ce(h, head, labels, w, chunk=chunk))(h, head)
  np.testing.assert_allclose(float(got[0]), ce.sum(), rtol=2e-6)
  np.testing.assert_allclose(float(got[1]), ce.sum(), rtol=2e-6)
  assert abs(np.asarray(logits)).mean() > 10  # the test's premise: bf16-rounded logits would be off
  val, _ = jax.jit(jax.value_and_grad(lambda h, head: L.weighted_ce(h, head, labels, w, chunk=chunk)[0],
                                      argnums=(0, 1)))(h, head)
  np.testing.assert_allclose(float(val), ce.sum(), rtol=2e-6)
  # what a bf16 logits chunk would give is far outside that tolerance
  lb = np.asarray(jnp.asarray(logits, jnp.float32).astype(jnp.bfloat16), np.float64)
  lse_b = np.log(np.exp(lb - lb.max(-1, keepdims=True)).sum(-1)) + lb.max(-1)
  ce_b = lse_b - np.take_along_axis(lb, np.asarray(labels)[..., None], -1)[..., 0]
  assert abs(ce_b.sum() - ce.sum()) / ce.sum() > 1e-4
