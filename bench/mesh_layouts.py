r"""Per-device bytes of the 8B training state (float32 parameters + Adam's two moments) on meshes whose
size does not divide the weights: before (a dimension its axis does not divide was silently replicated)
and now (such a mesh is refused; the first shape `sharding.working_meshes` offers instead). Abstract
shapes only: nothing is allocated, nothing compiles.

    python bench/mesh_layouts.py [--devices 24,48,256]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402

from lladav_jax import config, sharding  # noqa: E402
from lladav_jax.model import abstract_model  # noqa: E402


def state_bytes(params, mesh, *, fallback: bool) -> float:
  """One device's bytes: each float32 parameter and its two Adam moments over the axes its spec uses."""
  total = 0.0
  for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    spec = sharding.logical_to_spec(v.get_metadata()["out_sharding"], v.shape, mesh, parameter=fallback)
    shards = math.prod(mesh.shape[n] for s in spec if s for n in (s if isinstance(s, tuple) else (s,)))
    total += 3 * math.prod(v.shape) * 4 / shards
  return total


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", default="24,48,256")
  a = p.parse_args()
  params = abstract_model(config.llada_v_8b())[1]
  total = sum(3 * math.prod(v.shape) * 4 for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  gib = 2 ** 30
  print(f"8B state (f32 params + Adam): {total / gib:.1f} GiB in all")
  print("| devices | before: fsdp=N, GiB/device | now: fsdp=N | now: the shape offered | GiB/device | total / shards |")
  print("|---|---|---|---|---|---|")
  for n in map(int, a.devices.split(",")):
    flat = AbstractMesh((1, n, 1), sharding.PRESETS["fsdp_tp"])
    before = state_bytes(params, flat, fallback=False)
    try:
      sharding.check_layout(params, flat)
      now = "accepted"
    except sharding.LayoutError as e:
      now = "refused: " + e.args[0].splitlines()[1].strip().split(" ")[0]
    offer = sharding.working_meshes(params, n)[0]
    preset, rest = offer.split(": ")
    sizes = [int(x.split("=")[1]) for x in rest.split(" [")[0].split()]
    mesh = AbstractMesh(tuple(sizes), sharding.PRESETS[preset])
    shards = sizes[1] * sizes[2]
    print(f"| {n} | {before / gib:.2f} | {now} | {offer} | {state_bytes(params, mesh, fallback=True) / gib:.2f} | "
          f"{total / shards / gib:.2f} |")


if __name__ == "__main__":
  main()
