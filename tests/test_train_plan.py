"""The memory plan (`train --dry_run`): the real step compiled ahead of time on fake meshes, per-device bytes."""
import json
import subprocess

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import finetune
from lladav_jax import config
from lladav_jax.model import attention as attn, llm as llm_lib, vision as vision_lib
from lladav_jax.training import plan
from tests.train_helpers import PYTHON, REPO, subprocess_env


def test_plan_one_mesh_per_device_bytes():
  """On the conftest's 8 devices: one row a device a micro-batch (accum follows the batch shards), parameters and
  Adam's moments split over every weight axis, the memory figures and the plan's table."""
  full = plan.plan_one(finetune.get_config("stage2_si,runlocal"), "fsdp_tp", (1, 8, 1))
  tp = plan.plan_one(finetune.get_config("stage2_si,runlocal"), "fsdp_tp", (1, 4, 2))
  assert (full["global_batch"], full["accum"], tp["accum"]) == (8, 1, 2)
  assert full["micro_batch"] == tp["micro_batch"]  # one row a device either way
  assert 0 <= full["optimizer"] - 2 * full["parameters"] <= 64  # f32 mu and nu of f32 weights (+ step counts)
  assert abs(tp["parameters"] - full["parameters"]) < 0.05 * full["parameters"]  # 8 weight shards both ways
  assert full["temporaries"] > 0 and full["peak"] >= full["temporaries"]
  # what a remat policy keeps: every layer's input plus its tagged tensors (tiny: D 64, F 128, 4 + 2 + 2 heads of
  # 16; the tower: 32 wide, 729 patches a tile), in float32, heads and mlp split over tensor
  cfg = config.tiny(remat_policy="full")
  assert plan.saved_activation_bytes(cfg, 1, 1536, 1, 1) == 4 * (2 * 1536 * 64 + 2 * 729 * 32)
  assert plan.saved_activation_bytes(cfg.replace(remat_policy="minimal"), 1, 1536, 1, 2) == \
      4 * (2 * 1536 * (64 + 8 * 16 / 2 + 64 + 2 * 128 / 2) + 2 * 729 * 32)  # "mlp_out" is never read: not kept
  assert plan.saved_activation_bytes(cfg.replace(remat_policy="none"), 1, 1536, 1, 1) is None
  text = plan.table([full, tp, {"mesh": "fsdp:1,3,1", "error": "x"}], device_gib=(16, 80))
  assert "| fsdp_tp 1x4x2 | 8 | 4 x 2 | 1536, 1 |" in text and "failed: x" in text
  assert "| fits 16 GiB | fits 80 GiB |" in text and text.count("| yes | yes |") == 2  # the tiny model fits
  assert "| 0.00 |" not in text.split("\n")[2]  # a tiny model's figures in significant digits, not 0.00


def test_plan_of_the_finetune_preset_plans_its_packed_rows():
  """`finetune` packs conversations into rows: the plan compiles the same step on its full rows (seq_len tokens,
  tile_budget tiles) instead of refusing the preset."""
  cfg = finetune.get_config("finetune,model.preset=tiny,model.vocab_from_tokenizer=False,model.dtype=float32,"
                            "model.param_dtype=float32,data.seq_len=1536,data.tile_budget=2,train.global_batch_size=8")
  p = plan.plan_one(cfg, "fsdp_tp", (1, 8, 1))
  assert (p["tokens"], p["tiles"]) == (1536, 2) and p["temporaries"] > 0
  assert any("data.packing" in n for n in p["notes"])


@pytest.mark.slow  # a second compile in a subprocess; the in-process plan test covers the plan in the default run
def test_dry_run_cli_names_the_largest_buffers(tmp_path):
  """`train --dry_run` runs each mesh in a subprocess with its own device count and reads XLA's buffer assignment:
  the largest temporaries with the op that makes them (the dense attention scores of the tiny model: [.., L, L])."""
  out = subprocess.run([PYTHON, "-m", "lladav_jax.train", "--config=configs/finetune.py:stage2_si,runlocal", "--dry_run",
                        "--dry_run_meshes=fsdp_tp:1,4,2"], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-2000:]
  p = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
  assert p["devices"] == 8 and p["mesh"] == [1, 4, 2] and p["accum"] == 2
  assert p["largest"] and p["largest"][0][0] >= p["largest"][-1][0]
  assert any("1536,1536]" in shape for _, shape, _ in p["largest"])  # scores [.., 1536 queries, 1536 keys]
  assert p["saved_activations"] is None  # runlocal: remat "none" (XLA keeps what it needs)
  assert "| fsdp_tp 1x4x2 | 8 | 4 x 2 |" in out.stdout


def _kept_by_jax(modules, policy: str, length: int) -> int:
  """Bytes of the per-layer tensors JAX keeps for the backward under `policy` (the layer scans' stacked residuals
  in the forward of the gradient wrt weights and inputs): the LLM for one row of `length` tokens + the tower for
  one tile."""
  total = 0
  for module in modules:
    module.remat_policy = policy
    args = (jnp.arange(length)[None],) if isinstance(module, llm_lib.LLaDA) else ()
    graph, state = nnx.split(module)
    f = lambda state, x: nnx.merge(graph, state)(x, *args).astype(jnp.float32).sum()  # noqa: E731, B023
    x = jnp.ones((1, length, module.cfg.hidden_size) if args else (1, 384, 384, 3), jnp.float32)
    scan = next(e for e in jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(state, x).jaxpr.eqns
                if e.primitive.name == "scan")  # the forward's layer scan
    n = module.cfg.num_layers
    total += sum(v.aval.size * v.aval.dtype.itemsize for v in scan.outvars if v.aval.shape[:1] == (n,))
  return total


@pytest.mark.slow  # a third plan compile; the CI budget (test_lora checks the adapters-only optimizer state)
def test_plan_of_lora_has_a_small_optimizer_state():
  full = plan.plan_one(finetune.get_config("stage2_si,runlocal"), "fsdp_tp", (1, 8, 1))
  lora = plan.plan_one(finetune.get_config("lora,runlocal,model.lora.rank=2"), "fsdp_tp", (1, 8, 1))
  assert lora["lora_rank"] == 2 and lora["trainable"] == ["lora", "projector"]
  assert lora["optimizer"] < 0.2 * full["optimizer"]


@pytest.mark.slow  # the CI budget: test_plan_one_mesh_per_device_bytes checks the formula's values per policy
def test_saved_activations_are_what_jax_keeps():
  """The plan's analytic "saved by remat" equals the residuals JAX keeps, for every policy with the blockwise
  kernel (its custom-VJP residuals are recomputed with the layer) and for dense: the MLP's output is never kept."""
  for impl in ("blockwise", "dense"):
    cfg = config.tiny(attention_impl=impl, attention_block_q=32, attention_block_kv=32)
    settings, rngs = attn.AttentionConfig.from_config(cfg), nnx.Rngs(0)
    modules = (llm_lib.LLaDA(cfg.llm, attention=settings, rngs=rngs),
               vision_lib.SigLIPVision(cfg.vision, attention=settings, rngs=rngs))
    for policy, names in config.REMAT_POLICIES.items():
      if names is not None and (impl == "blockwise" or policy == "minimal"):
        assert _kept_by_jax(modules, policy, 96) == \
            plan.saved_activation_bytes(cfg.replace(remat_policy=policy), 1, 96, 1, 1), (policy, impl)
