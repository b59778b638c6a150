"""Config overrides from the real command line (`--config.FIELD=VALUE` and the `:PRESET,FIELD=VALUE`
suffix) reach the resolved settings with their types; bad fields are all reported at once."""
import json
import subprocess

import pytest

from configs import finetune
from tests.train_helpers import PYTHON, REPO, subprocess_env

# One override of each kind, as FIELD -> command-line VALUE, and where it lands in the resolved settings.
OVERRIDES = {
    "train.global_batch_size": "16",  # int
    "optim.lr": "0.005",  # float
    "loss.antithetic": "true",  # bool
    "checkpoint.async_save": "false",
    "optim.schedule": "linear",  # string
    "data.buckets": "(768,1536)",  # tuple
    "optim.trainable": "('projector','llm')",
    "model.vocab_size": "600",  # fields that default to None (placeholders)
    "optim.group_lr.llm": "0.002",
    "eval.gen_length": "5",
}


def _resolved(s):
  return {"train.global_batch_size": s["train"]["global_batch_size"], "optim.lr": s["optim"]["lr"],
          "loss.antithetic": s["loss"]["antithetic"], "checkpoint.async_save": s["checkpoint"]["async_save"],
          "optim.schedule": s["optim"]["schedule"], "data.buckets": s["data"]["pipeline"]["buckets"],
          "optim.trainable": s["optim"]["trainable"], "model.vocab_size": s["model"]["llm"]["vocab_size"],
          "optim.group_lr.llm": s["optim"]["group_lr"].get("llm"), "eval.gen_length": s["eval"]["gen_length"]}


WANT = {"train.global_batch_size": 16, "optim.lr": 0.005, "loss.antithetic": True, "checkpoint.async_save": False,
        "optim.schedule": "linear", "data.buckets": [768, 1536], "optim.trainable": ["projector", "llm"],
        "model.vocab_size": 600, "optim.group_lr.llm": 0.002, "eval.gen_length": 5}


def _train_cli(*args):
  return subprocess.run([PYTHON, "-m", "lladav_jax.train", *args], cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)


def test_defaults_differ_from_the_overrides():
  c = finetune.get_config("finetune,runlocal")
  assert c.model.vocab_size is None and c.optim.group_lr.llm is None and c.eval.gen_length is None
  for field, want in WANT.items():
    node = c
    for p in field.split("."):
      node = node[p]
    assert node != want and node != (tuple(want) if isinstance(want, list) else want), field


@pytest.mark.parametrize("form", ["flags", "suffix"])
def test_overrides_from_the_command_line(form):
  if form == "flags":
    args = ["--config=configs/finetune.py:finetune,runlocal"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  else:  # the suffix first, then a --config flag over it
    suffix = ",".join(f"{k}={v}" for k, v in OVERRIDES.items())
    args = [f"--config=configs/finetune.py:finetune,runlocal,train.num_steps=5,{suffix}", "--config.train.num_steps=7"]
  r = _train_cli(*args, "--print_config")
  assert r.returncode == 0, r.stderr
  s = json.loads(r.stdout)
  assert _resolved(s) == WANT
  assert type(s["optim"]["lr"]) is float and type(s["train"]["global_batch_size"]) is int
  assert s["train"]["num_steps"] == (7 if form == "suffix" else 12)  # runlocal's 12 when not overridden
  assert s["model"]["mask_token_id"] == 500 and s["data"]["kind"] == "synthetic"  # the preset's, untouched


def test_suffix_errors_name_the_field():
  with pytest.raises(ValueError, match=r"data\.seq_len=abc: not a int"):
    finetune.get_config("finetune,runlocal,data.seq_len=abc")
  with pytest.raises(ValueError, match=r"no field 'data\.seq_length'"):
    finetune.get_config("finetune,data.seq_length=5")
  with pytest.raises(ValueError, match=r"optim is a ConfigDict"):
    finetune.get_config("finetune,optim=5")
  assert finetune.get_config("stage1,runlocal").data.kind == "synthetic"  # runlocal is still a modifier


def test_every_bad_field_is_reported_at_once():
  r = _train_cli("--config=configs/finetune.py:finetune,runlocal", "--print_config",
                 "--config.loss.eps=2.0", "--config.optim.schedule=wavy", "--config.train.grad_accum_steps=3",
                 "--config.data.synthetic_tiles=4")
  assert r.returncode == 2, r.stderr
  for field in ("loss.eps=2.0", "optim.schedule='wavy'", "train.grad_accum_steps=3", "data.synthetic_tiles=4"):
    assert field in r.stderr, (field, r.stderr)
  assert r.stdout == ""


@pytest.mark.parametrize("preset", finetune.PRESETS)
def test_none_fields_are_typed_placeholders(preset):
  """A field left None must declare its type (config_dict.placeholder), or `--config.FIELD=VALUE` cannot parse."""
  def none_fields(node, prefix=""):
    for k in node.keys():
      v = node[k]
      if hasattr(v, "keys"):
        yield from none_fields(v, f"{prefix}{k}.")
      elif v is None:
        yield f"{prefix}{k}", node.get_type(k)

  for c in (finetune.get_config(preset), finetune.get_config(f"{preset},runlocal")):
    found = dict(none_fields(c))
    assert "eval.gen_length" in found or preset == "demo"
    untyped = [k for k, t in found.items() if t is type(None)]
    assert not untyped, untyped
