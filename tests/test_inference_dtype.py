"""Inference keeps the checkpoint's parameter dtype: a bf16 checkpoint (the released layout, tests/released.py) loads
with bf16 parameters, half the bytes of float32 copies and the same logits; dtype="float32" still gives float32
parameters and compute; the 8B tree is 15.7 GiB in bf16 and 31.4 GiB in float32 (abstract, nothing allocated)."""
import json
import math

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lladav_jax import LLaDAV, config, convert, sharding, weights
from lladav_jax.eval import __main__ as eval_cli
from lladav_jax.eval.lmms_plugin import LLaDAVJax
from lladav_jax.eval.tasks import get_task
from lladav_jax.inference import SamplingParams
from lladav_jax.model import abstract_model
from tests.released import write_released_checkpoint

GIB = 2 ** 30
IDS = [[126080, 5, 6, 7, 8, 9], [126080, 11, 12, 13, 14, 15]]  # text: logits over 126464 ids stay small


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
  _, d = write_released_checkpoint(str(tmp_path_factory.mktemp("bf16") / "LLaDA-V"), dtype=ml_dtypes.bfloat16)
  return d


def param_dtypes(model) -> set[str]:
  return {str(v.dtype) for v in weights.flat_params(model.state).values()}


def outputs(model):
  """Float32 logits of IDS, and the embeddings of a prompt with an image (vision tower, projector, splice)."""
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8))
  batch = model.prepare([[126080, 5, -200, 7]], [[img]])
  embed = jax.jit(lambda s, b: nnx.merge(model.graphdef, s).embed(b.tokens, b.pixels, b.merge_idx, b.merge_w))
  return model.logits(IDS), np.asarray(embed(model.state, batch)).astype(np.float32)


def assert_same(a, b):
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_bf16_checkpoint_loads_bf16_params_with_the_same_logits(bf16_dir):
  assert weights.checkpoint_dtype(bf16_dir) == "bfloat16"
  model = LLaDAV.from_pretrained(bf16_dir)
  assert (model.cfg.dtype, model.cfg.param_dtype) == ("bfloat16", "bfloat16")
  assert param_dtypes(model) == {"bfloat16"}
  # The former default: float32 copies of the same weights, cast back to bf16 at every use. Casts of
  # bf16 values are exact, so the logits are bit-identical.
  before = LLaDAV.from_pretrained(bf16_dir, param_dtype="float32")
  assert (before.cfg.dtype, param_dtypes(before)) == ("bfloat16", {"float32"})
  out = outputs(model)
  assert out[0].dtype == np.float32
  assert_same(out, outputs(before))


def test_float32_stays_available_and_unchanged(bf16_dir):
  model = LLaDAV.from_pretrained(bf16_dir, dtype="float32")
  assert (model.cfg.dtype, model.cfg.param_dtype) == ("float32", "float32")
  assert param_dtypes(model) == {"float32"}
  # the same as load_state at an explicit float32 config
  cfg = weights.load_model_config(bf16_dir, dtype="float32", param_dtype="float32")
  state = weights.load_state(bf16_dir, cfg, sharding.make_mesh(devices=jax.devices()[:1]))
  ref = LLaDAV(cfg, abstract_model(cfg)[0], state)
  f32 = outputs(model)
  assert_same(f32, outputs(ref))
  # bf16 compute stays close to it
  for x, y in zip(outputs(LLaDAV.from_pretrained(bf16_dir)), f32):
    assert np.abs(x - y).max() <= 0.05 * np.abs(y).max()


def test_float16_as_the_original_evaluates(bf16_dir):
  """The original's eval loads the model in fp16: dtype="float16" gives float16 parameters and compute, float32
  logits, close to float32 (bench/precision.py measures the gaps and the token agreement for docs/FIDELITY.md)."""
  model = LLaDAV.from_pretrained(bf16_dir, dtype="float16")
  assert (model.cfg.dtype, param_dtypes(model)) == ("float16", {"float16"})
  f16, f32 = outputs(model), outputs(LLaDAV.from_pretrained(bf16_dir, dtype="float32"))
  assert f16[0].dtype == np.float32 and all(np.isfinite(x).all() for x in f16)
  for x, y in zip(f16, f32):
    assert np.abs(x - y).max() <= 0.01 * np.abs(y).max()
  out = model.generate(["What color is the shape?"], params=SamplingParams(gen_length=4))[0]  # the sampler's head
  assert out.nfe == 4 and 1 <= len(out.token_ids) <= 4
  with pytest.raises(ValueError, match="dtype='float64' must be one of"):
    LLaDAV.from_pretrained(bf16_dir, dtype="float64")


def test_orbax_and_config_only_dtypes(bf16_dir, tmp_path):
  orbax = convert.hf_to_orbax(bf16_dir, str(tmp_path / "orbax"))
  assert weights.checkpoint_dtype(orbax) == "bfloat16"  # from the Orbax metadata
  model = LLaDAV.from_pretrained(orbax)
  assert param_dtypes(model) == {"bfloat16"}
  assert_same(outputs(model), outputs(LLaDAV.from_pretrained(bf16_dir)))
  # without weight files, config.json's torch_dtype (transformers 5: dtype) decides
  for key in ("torch_dtype", "dtype"):
    d = tmp_path / key
    d.mkdir()
    (d / "config.json").write_text(json.dumps({key: "float16"}))
    assert weights.checkpoint_dtype(str(d)) == "float16"


def test_float32_checkpoint_keeps_float32_params(tmp_path):
  _, d = write_released_checkpoint(str(tmp_path / "f32"))
  model = LLaDAV.from_pretrained(d)
  assert (model.cfg.dtype, model.cfg.param_dtype) == ("bfloat16", "float32")
  assert param_dtypes(model) == {"float32"}


def test_eval_cli_and_lmms_plugin_pass_the_dtype(bf16_dir):
  parse = lambda *a: eval_cli.build_parser().parse_args(["--checkpoint", bf16_dir, "--data", "x", *a])
  # a paper task evaluates in float16, as the original; --dtype overrides it; the demo task keeps the checkpoint's
  assert param_dtypes(eval_cli._load_model(parse("--task", "ai2d"), get_task("ai2d"))) == {"float16"}
  assert param_dtypes(eval_cli._load_model(parse("--task", "ai2d", "--dtype", "bfloat16"), get_task("ai2d"))) == {"bfloat16"}
  assert param_dtypes(eval_cli._load_model(parse("--task", "demo"), get_task("demo"))) == {"bfloat16"}
  assert param_dtypes(LLaDAVJax(pretrained=bf16_dir, dtype="float32").model) == {"float32"}


def tree_bytes(cfg) -> int:
  """Bytes of the parameter tree of `cfg`, from the abstract model (nothing allocated)."""
  flat = weights.flat_params(abstract_model(cfg)[1])
  return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in flat.values())


def test_8b_parameter_tree_bytes():
  cfg = config.llada_v_8b()
  bf16, f32 = tree_bytes(cfg.replace(param_dtype="bfloat16")), tree_bytes(cfg.replace(param_dtype="float32"))
  print(f"8B parameter tree: bfloat16 {bf16 / GIB:.2f} GiB, float32 {f32 / GIB:.2f} GiB")
  assert bf16 / GIB == pytest.approx(15.7, rel=0.01)
  assert f32 / GIB == pytest.approx(31.4, rel=0.01)
  assert f32 == 2 * bf16
