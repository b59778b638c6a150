"""glibc malloc settings for runs on the CPU backend: each step's temporaries are reused, not re-faulted.

XLA's CPU runtime allocates a compiled program's temporaries as one block with malloc, on its worker
threads, every time the program runs. glibc serves a block that large with a fresh mmap (a thread's arena
grows in 64 MiB heaps; the main arena maps anything over 32 MiB) and unmaps it on free, so every step
faults in every page again. One arena that never maps and never trims keeps the freed block for the next
step (the demo's figures: bench/demo_steps.py's notes).

Called before JAX creates its threads (an arena is bound to a thread when it first allocates), and only
where the run can only be on the CPU: with an accelerator the host allocations are the data pipeline's and
checkpoints', which one arena would serialise and no-trim would keep. An allocator chosen by the user
(LD_PRELOAD, MALLOC_* variables, GLIBC_TUNABLES) is left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
USER_CHOICE = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
               "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def cpu_only() -> bool:
  """True when JAX can only pick its CPU backend: JAX_PLATFORMS says cpu, or no accelerator plugin
  (jax_plugins entry points, the namespace package, libtpu) is installed. Imports no JAX."""
  plats = os.environ.get("JAX_PLATFORMS", "").strip()
  if plats:
    return plats.split(",")[0].strip() == "cpu"
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  return importlib.util.find_spec("jax_plugins") is None and importlib.util.find_spec("libtpu") is None


def reuse_freed_memory() -> bool:
  """Applies the settings above when the run is CPU-only on glibc and the user chose no allocator.
  Returns whether it did."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if any(os.environ.get(k) for k in USER_CHOICE) or not cpu_only():
    return False
  libc = ctypes.CDLL("libc.so.6")
  return all(libc.mallopt(p, v) == 1 for p, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1)))


def tcmalloc_path() -> str | None:
  """The installed tcmalloc (Debian's libtcmalloc-minimal4), or None."""
  return ctypes.util.find_library("tcmalloc_minimal")


def rerun_with_tcmalloc(argv: list[str]) -> None:
  """Replaces this process with `argv` run under tcmalloc (LD_PRELOAD), when it is installed, the run is CPU-only
  and the user chose no allocator; returns only if it did not. For CPU programs too large for the one-arena
  settings above (a large step fragments that one heap: bench/train.py's notes): tcmalloc keeps freed blocks
  without faulting them in again."""
  lib = tcmalloc_path()
  if lib is None or platform.system() != "Linux" or any(os.environ.get(k) for k in USER_CHOICE) or not cpu_only():
    return
  os.execve(argv[0], argv, dict(os.environ, LD_PRELOAD=lib))
