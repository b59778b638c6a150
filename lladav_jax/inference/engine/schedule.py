"""How many tokens each denoising step of a block commits: the count tables.

A block holding `n` masked answer positions at its start is decoded in `S` steps (S = steps per
block); step i commits `table[n, i]` tokens. Both schedules are computed on the host with NumPy
once per (block_length, S, schedule) and looked up on device, so `n` may differ per sample.

  uniform (the original's `get_num_transfer_tokens`): n // S each, the first n % S steps get one
    more.
  shift (LaViDa's `get_num_transfer_tokens_sch(schedule="shift")`): S' = min(S, n) steps;
    t = linspace(0, 1, S' + 1); sigma = shift * t / (1 + (shift - 1) * t); counts =
    diff(int(sigma * n)), clamped to >= 1; the surplus is removed one token at a time, cycling
    over the entries that are > 1 from the first; then the order is reversed. LaViDa computes in
    float32 torch; `_torch_linspace_f32` and the float32 arithmetic below reproduce it bit for
    bit (tests/test_sampler_accel.py checks against torch), because int() of sigma * n sits
    on integer boundaries (n=32, S=16, shift=1/3 gives sigma * n = 8.000001 at t = 0.5).
    Example, n=32, S=16, shift=1/3: [6,4,4,2,3,2,2,1,1,1,1,1,1,1,1,1]. (The vector
    [6,4,4,2,3,2,2,1,2,1,1,1,1,1,1,1] sometimes quoted for this case is the clamped vector before
    the surplus is removed; it sums to 33.) shift < 1 commits more tokens early. Where float
    rounding leaves sigma(1) * n just below n (LaViDa's assert fails, e.g. n=2, S=1, shift=0.1),
    the shortfall goes to the step at t = 1 (the first step after the reversal).
"""
from __future__ import annotations

import functools

import numpy as np


def uniform_counts(n: int, steps: int) -> list[int]:
  base, rem = divmod(n, steps)
  return [base + (1 if i < rem else 0) for i in range(steps)]


def _torch_linspace_f32(steps_plus_one: int) -> np.ndarray:
  """torch.linspace(0, 1, m) in float32 on CPU: start + step*i below half, end - step*(m-1-i) above."""
  m = steps_plus_one
  if m == 1:
    return np.zeros(1, np.float32)
  step = np.float32(1.0) / np.float32(m - 1)
  i = np.arange(m)
  lo = (step * i.astype(np.float32)).astype(np.float32)
  hi = (np.float32(1.0) - step * (m - 1 - i).astype(np.float32)).astype(np.float32)
  return np.where(i < m // 2, lo, hi).astype(np.float32)


def shift_counts(n: int, steps: int, shift: float) -> list[int]:
  """LaViDa's timestep-shift counts for `n` masked tokens, padded with zeros to `steps` entries."""
  if n <= 0:
    return [0] * steps
  s_eff = int(min(steps, n))
  t = _torch_linspace_f32(s_eff + 1)
  a = np.float32(shift)
  b = np.float32(shift - 1.0)
  sigma = ((a * t).astype(np.float32) / (np.float32(1.0) + (b * t).astype(np.float32))).astype(np.float32)
  cum = (sigma * np.float32(n)).astype(np.float32).astype(np.int64)  # truncation, as .to(int64)
  v = np.maximum(np.diff(cum), 1)
  delta = int(v.sum()) - n
  if delta < 0:  # float rounding left sigma(1) * n below n (LaViDa asserts here): the last t gets it
    v[-1] -= delta
    delta = 0
  j = 0
  while delta > 0:
    j %= len(v)
    if v[j] == 1:
      j += 1
      continue
    delta -= 1
    v[j] -= 1
    j += 1
  assert int(v.sum()) == n
  out = v[::-1].tolist()
  return out + [0] * (steps - len(out))


@functools.lru_cache(maxsize=64)
def count_table(block_length: int, steps: int, schedule: str = "uniform", shift: float = 1 / 3) -> np.ndarray:
  """int32 [block_length + 1, steps]: row n = the per-step counts for n masked positions."""
  rows = []
  for n in range(block_length + 1):
    if schedule == "uniform":
      rows.append(uniform_counts(n, steps))
    elif schedule == "shift":
      rows.append(shift_counts(n, steps, shift))
    else:
      raise ValueError(f"unknown schedule {schedule!r}; use 'uniform' or 'shift'")
  table = np.asarray(rows, np.int32)
  table.setflags(write=False)
  return table
