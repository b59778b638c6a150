"""`SamplingParams`, the one type of a request's settings: its defaults, its validation naming the field, the
values it hands the engine, and the server's one conversion onto it (`ChatRequest.to_sampling_params`)."""
import dataclasses

import numpy as np
import pytest

from lladav_jax import config
from lladav_jax.inference import ParamsError, SamplingParams
from lladav_jax.inference.engine import MODES
from lladav_jax.serve.protocol import ChatRequest, FieldError

USER = [{"role": "user", "content": "hi"}]


def test_block_length_and_steps_default_to_the_answer_length():
  p = SamplingParams(gen_length=16)
  assert (p.gen_length, p.block_length, p.steps, p.num_blocks, p.steps_per_block) == (16, 16, 16, 1, 16)
  assert SamplingParams().gen_length == 128 and SamplingParams(gen_length=32, steps=8).block_length == 32
  assert SamplingParams(stop="x").stop == ("x",) and SamplingParams(stop=["a", "b"]).stop == ("a", "b")


@pytest.mark.parametrize("kw, field", [
    (dict(gen_length=10, block_length=4), "block_length"),
    (dict(gen_length=16, block_length=4, steps=6), "steps"),
    (dict(remasking="entropy"), "remasking"),
    (dict(threshold=0.5, factor=1.0), "threshold"),
    (dict(cache="full"), "cache"),
    (dict(transfer_ratio=1.5), "transfer_ratio"),
    (dict(temperature=-1.0), "temperature"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(stop=("a", "")), "stop"),
    (dict(stop_rule="latest"), "stop_rule"),
    (dict(mask_id=5, banned_ids=(5,)), "mask_id"),
])
def test_validate_names_the_field(kw, field):
  with pytest.raises(ParamsError) as e:
    SamplingParams(**kw).validate()
  assert e.value.field == field and field in str(e.value)


def test_for_model_sets_the_token_ids_and_explicit_ids_win():
  from tests.models import random_model
  model = random_model(config.tiny())  # no tokenizer: only the mask id is the model's
  p = SamplingParams(gen_length=8).for_model(model)
  assert p.mask_id == model.cfg.mask_token_id and p.banned_ids is None and p.eot_id is None
  assert SamplingParams(gen_length=8, eot_id=3, banned_ids=[1, 2]).for_model(model).banned_ids == (1, 2)
  with pytest.raises(ValueError, match="for_model"):
    SamplingParams().engine_config()


def test_engine_config_and_row_params():
  p = SamplingParams(gen_length=16, block_length=8, steps=8, temperature=0.5, cfg_scale=1.5, threshold=0.9,
                     cache="dllm", transfer_ratio=0.5, stop_rule="original", mask_id=7, banned_ids=(1,))
  cfg = p.engine_config()
  assert (cfg.mask_id, cfg.banned_ids, cfg.max_block_length, cfg.cache, cfg.guidance, cfg.max_transfer_ratio) == \
      (7, (1,), 8, "dllm", True, 0.5)
  assert not dataclasses.replace(p, cfg_scale=0.0).engine_config().guidance
  rp = p.row_params(answer_bucket=24, max_block_length=8)
  assert (int(rp.answer_len), int(rp.block_length), int(rp.steps_per_block), float(rp.temperature), int(rp.mode)) == \
      (16, 8, 4, 0.5, MODES["threshold"])
  assert bool(rp.original_stops) and np.isclose(float(rp.value), 0.9) and rp.table.shape == (9, 8)
  # an engine of longer blocks takes the row: its table padded with steps that commit nothing
  wide = p.row_params(answer_bucket=24, max_block_length=16)
  assert wide.table.shape == (17, 16) and int(wide.block_length) == 8
  np.testing.assert_array_equal(wide.table[:9, :8], rp.table)
  assert not wide.table[9:].any() and not wide.table[:, 8:].any()
  assert p.engine_config(max_block_length=16).max_block_length == 16
  with pytest.raises(ValueError, match="answer bucket"):
    p.row_params(answer_bucket=8, max_block_length=8)
  with pytest.raises(ValueError, match="max_block_length"):
    p.row_params(answer_bucket=24, max_block_length=4)


def test_chat_request_is_one_conversion_onto_sampling_params():
  r = ChatRequest(model="m", messages=USER, max_tokens=16, temperature=0.7, block_length=8, seed=3, stop="\n")
  p = r.to_sampling_params()
  assert (p.gen_length, p.block_length, p.steps, p.temperature, p.seed, p.stop) == (16, 8, 16, 0.7, 3, ("\n",))
  # unset fields take SamplingParams's own defaults (written once)
  d, q = SamplingParams(), ChatRequest(model="m", messages=USER).to_sampling_params()
  assert all(getattr(q, f) == getattr(d, f) for f in ("gen_length", "temperature", "refresh_interval", "remasking",
                                                       "cfg_scale", "cache", "stop_rule"))
  with pytest.raises(FieldError) as e:  # the request's own field names
    ChatRequest(model="m", messages=USER, max_tokens=16, block_length=5).to_sampling_params()
  assert e.value.param == "block_length"
  with pytest.raises(FieldError) as e:
    ChatRequest(model="m", messages=USER, max_tokens=16, block_length=8, steps=3).to_sampling_params()
  assert e.value.param == "steps"
