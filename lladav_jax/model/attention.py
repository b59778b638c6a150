"""Bidirectional attention with segment ids: one entry point, several kernels.

`attention(q, k, v, q_segments, kv_segments, impl=...)`:
  q [B, T, N, H], k / v [B, S, K, H] (N a multiple of K: grouped-query), q_segments int [B, T],
  kv_segments int [B, S]. A query attends the keys of its own segment id, fully bidirectionally; id 0 is
  padding: a padding query attends nothing and a padding key is never attended. A query with no key to
  attend returns zeros (every implementation, forward and backward). `cached=(k0, v0, segments0)` puts
  earlier keys ahead of the new ones (the sampler's prefix / dual caches).

Implementations (`IMPLS`):
  dense      the scores in full with a [B, T, S] mask, as jax.nn.dot_product_attention (XLA) computes them:
             the reference; O(T S) memory.
  blockwise  pure JAX flash attention: a scan over query blocks and key blocks with an online max / sum,
             a custom VJP that recomputes the scores block by block: O(T + S) memory, every backend.
  splash     the Pallas TPU Splash kernel with segment ids, inside shard_map over the batch / head axes
             (`interpret=True` runs it on CPU, tests only).
  cudnn      jax.nn.dot_product_attention(implementation="cudnn") with the mask (GPU, half precision).
  pallas_gpu the Pallas GPU (Triton) flash-attention op with segment ids (GPU; no cache: T == S; its
             float32 dots are TF32).
  auto       `select`: splash on TPU, cudnn / pallas_gpu on GPU for half precision where they apply, else
             dense while its scores fit `dense_limit_bytes`, else blockwise.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lladav_jax import sharding as shd
from lladav_jax.config import ATTENTION_IMPLS

IMPLS = tuple(i for i in ATTENTION_IMPLS if i != "xla")
ALIASES = {"xla": "dense"}  # accepted so that configs naming "xla" still load
# `auto` keeps dense below this many bytes of float32 scores a call (all rows and heads): faster on CPU.
DENSE_LIMIT_BYTES = 1 << 30
_NEG = -1e30  # a finite "minus infinity": masked scores never make a NaN (exp(-inf - -inf))


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """The static attention choice a module holds (from ModelConfig): implementation and block sizes."""
  impl: str = "auto"
  block_q: int = 512
  block_kv: int = 512
  interpret: bool = False  # Pallas kernels in interpret mode (CPU tests of splash / pallas_gpu)

  @classmethod
  def from_config(cls, cfg) -> "AttentionConfig":
    return cls(canonical(cfg.attention_impl), cfg.attention_block_q, cfg.attention_block_kv)

  def __call__(self, q, k, v, q_segments, kv_segments, cached=None):
    return attention(q, k, v, q_segments, kv_segments, impl=self.impl, cached=cached, block_q=self.block_q,
                     block_kv=self.block_kv, interpret=self.interpret)


def canonical(impl: str) -> str:
  """The implementation name with the aliases resolved; a clear error naming the field otherwise."""
  impl = ALIASES.get(impl, impl)
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} must be one of {IMPLS} (or the alias 'xla' = 'dense')")
  return impl


def select(impl: str, *, backend: str, batch: int, q_len: int, kv_len: int, heads: int, head_dim: int,
           dtype, cached: bool, dense_limit_bytes: int = DENSE_LIMIT_BYTES) -> str:
  """The implementation a call runs (static: shapes, dtype and backend are known at trace time)."""
  impl = canonical(impl)
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if impl == "pallas_gpu" and (cached or q_len != kv_len):
    # the op takes one segment-id array for queries and keys alike
    return select("auto", backend=backend, batch=batch, q_len=q_len, kv_len=kv_len, heads=heads,
                  head_dim=head_dim, dtype=dtype, cached=cached, dense_limit_bytes=dense_limit_bytes)
  if impl != "auto":
    return impl
  if backend == "tpu":
    return "splash"
  if backend == "gpu" and half:
    if head_dim <= 128 and head_dim % 8 == 0:
      return "cudnn"  # cuDNN's flash kernels: half precision, head_dim <= 128
    if not cached and q_len == kv_len and head_dim & (head_dim - 1) == 0:
      return "pallas_gpu"
  # float32 on a GPU stays with XLA (dense / blockwise), whose dots follow jax_default_matmul_precision: the
  # Triton kernel's float32 dot is TF32 whatever that says (docs/FIDELITY.md, row 14)
  fits = batch * heads * q_len * kv_len * 4 <= dense_limit_bytes
  return "dense" if fits else "blockwise"


def attention(q, k, v, q_segments, kv_segments, *, impl: str = "auto", cached=None, block_q: int = 512,
              block_kv: int = 512, dense_limit_bytes: int = DENSE_LIMIT_BYTES, interpret: bool = False):
  """Segment-masked bidirectional attention (see the module docstring). Returns [B, T, N, H] in q's dtype.

  float16 operands go in as float32 (every implementation): XLA's CPU dot has no f16 x f16 -> f32 form,
  and the upcast is exact (f16 products fit f32), so this is the f32-accumulated fp16 attention of a GPU."""
  if cached is not None:
    k0, v0, s0 = cached
    k = jnp.concatenate([k0.astype(k.dtype), k], axis=1)
    v = jnp.concatenate([v0.astype(v.dtype), v], axis=1)
    kv_segments = jnp.concatenate([s0, kv_segments], axis=1)
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  if n % kh:
    raise ValueError(f"query heads {n} are not a multiple of key/value heads {kh}")
  if q_segments.shape != (b, t) or kv_segments.shape != (b, s):
    raise ValueError(f"segment ids {q_segments.shape} / {kv_segments.shape} do not match queries {(b, t)} "
                     f"and keys {(b, s)}")
  dt = q.dtype
  if dt == jnp.float16:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  q_segments, kv_segments = q_segments.astype(jnp.int32), kv_segments.astype(jnp.int32)
  which = select(impl, backend=jax.default_backend(), batch=b, q_len=t, kv_len=s, heads=n, head_dim=h,
                 dtype=dt, cached=cached is not None, dense_limit_bytes=dense_limit_bytes)
  if which == "dense":
    out = dense(q, k, v, q_segments, kv_segments)
  elif which == "blockwise":
    out = blockwise(q, k, v, q_segments, kv_segments, block_q=block_q, block_kv=block_kv)
  elif which == "splash":
    if jax.default_backend() != "tpu" and not interpret:
      raise ValueError("attention_impl='splash' needs a TPU (or interpret=True, tests only)")
    out = splash(q, k, v, q_segments, kv_segments, block_q=block_q, block_kv=block_kv, interpret=interpret)
  elif which == "cudnn":
    out = cudnn(q, k, v, q_segments, kv_segments)
  else:
    if jax.default_backend() != "gpu" and not interpret:
      raise ValueError("attention_impl='pallas_gpu' needs a GPU (or interpret=True, tests only)")
    out = pallas_gpu(q, k, v, q_segments, block_q=block_q, block_kv=block_kv, interpret=interpret)
  return out.astype(dt)


# ----------------------------------------------------------------------------- dense (the reference)

def segment_mask(q_segments, kv_segments):
  """bool [B, T, S]: equal non-zero ids."""
  return (q_segments[:, :, None] == kv_segments[:, None, :]) & (q_segments[:, :, None] > 0)


def dense(q, k, v, q_segments, kv_segments):
  """The scores in full, as jax.nn.dot_product_attention's XLA path computes them (the scale after the dot, the
  softmax in float32), with the heads moved ahead of the positions first: [B, K, G*T, H] queries and [B, K, S, H]
  keys and values are the layouts XLA's batched dots take as they are. From [B, T, N, H] XLA:CPU chooses
  transposed keys [B, N, H, S] and probabilities instead, built by slow element-by-element strided copies
  (figures: bench/train.py's notes)."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  mask = segment_mask(q_segments, kv_segments)
  # [B, N, T, H] read as [B, K, G*T, H]: a KV head's G query heads and T positions as one axis of rows (5-D
  # dots XLA lays out its own way)
  qh, kt, vt = (_heads_first(x) for x in (q, k, v))
  qh = qh.reshape(b, kh, g * t, h)
  scores = jnp.einsum("BKMH,BKSH->BKMS", qh, kt) * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
  scores = jnp.where(jnp.tile(mask, (1, g, 1))[:, None], scores, jnp.asarray(_NEG, scores.dtype))
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
  out = _heads_first(jnp.einsum("BKMS,BKSH->BKMH", probs, vt).reshape(b, n, t, h))  # back to [B, T, N, H]
  # a query with no key: zeros (XLA's softmax over all-masked scores would give the mean of the values)
  return _zero_without_key(out, mask.any(-1), q.dtype)


def _heads_first(x):
  """Axes 1 and 2 swapped ([B, T, N, H] <-> [B, N, T, H]); on CPU as a copy of its own (an optimization barrier),
  which XLA would otherwise fold into the dot's dimension numbers and lay out its own way."""
  swap = lambda v: jnp.swapaxes(v, 1, 2)  # noqa: E731
  return jax.lax.platform_dependent(x, cpu=lambda v: jax.lax.optimization_barrier(swap(v)), default=swap)


def cudnn(q, k, v, q_segments, kv_segments):
  mask = segment_mask(q_segments, kv_segments)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=False, implementation="cudnn")
  return _zero_without_key(out, mask.any(-1), q.dtype)


def _zero_without_key(out, has_key_BT, dtype):
  """The module's rule: a query with no key to attend gets zeros (out [B, T, N, H], has_key_BT bool [B, T])."""
  return jnp.where(has_key_BT[:, :, None, None], out, 0).astype(dtype)


def has_key(q_segments, kv_segments):
  """bool [B, T]: the query's segment is non-zero and some key carries it; O((T + S) log S), no [T, S]."""
  def one(qs, ks):
    srt = jnp.sort(ks)
    i = jnp.clip(jnp.searchsorted(srt, qs), 0, ks.shape[0] - 1)
    return (srt[i] == qs) & (qs > 0)
  return jax.vmap(one)(q_segments, kv_segments)


# ----------------------------------------------------------------------------- blockwise (flash, pure JAX)

def _pad_to(x, n, axis, value=0):
  extra = -x.shape[axis] % n
  if not extra:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad, constant_values=value)


def blockwise(q, k, v, q_segments, kv_segments, *, block_q: int = 512, block_kv: int = 512):
  """Flash attention in plain JAX. Shapes are padded to whole blocks (padding carries segment id 0 and
  never matches); the scores a step holds are [B, K, G, block_q, block_kv]."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  bq, bk = min(block_q, t), min(block_kv, s)
  q5 = _pad_to(q, bq, 1).reshape(b, -1, kh, n // kh, h)  # [B, T', K, G, H]
  qs = _pad_to(q_segments, bq, 1)
  k, v, ks = _pad_to(k, bk, 1), _pad_to(v, bk, 1), _pad_to(kv_segments, bk, 1)
  out = _flash(q5, k, v, qs, ks, bq, bk, 1.0 / math.sqrt(h))
  return out.reshape(b, -1, n, h)[:, :t]


def _blocks(x, size, axis=1):
  """[B, L, ...] -> [L / size, B, size, ...]: the scan's leading axis."""
  shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x, axis=1):
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _scores(q_blk, k_blk, qs_blk, ks_blk, scale):
  """Masked float32 scores [B, K, G, bq, bk] and the mask."""
  # The mask depends on the segment ids alone, the same in every layer: under the gradient of the layer scan,
  # JAX's scan partial evaluation hoists such loop-invariant work out of the loop, and would compute every
  # block's mask up front as one [L / bq, L / bk, B, K, G, bq, bk] array (O(L^2): 2 GiB for 32 heads at 8192
  # tokens). Tying the ids to this block's queries keeps each mask inside its step.
  qs_blk, ks_blk, q_blk = jax.lax.optimization_barrier((qs_blk, ks_blk, q_blk))
  s = jnp.einsum("BQKGH,BSKH->BKGQS", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
  mask = (qs_blk[:, :, None] == ks_blk[:, None, :]) & (qs_blk[:, :, None] > 0)  # [B, bq, bk]
  mask = mask[:, None, None]
  return jnp.where(mask, s, _NEG), mask


def _fwd_blocks(q, k, v, qs, ks, bq, bk, scale):
  """Output [B, T, K, G, H] and the log-sum-exp [B, K, G, T] (0 where a query has no key)."""
  kb, vb, ksb = _blocks(k, bk), _blocks(v, bk), _blocks(ks, bk)

  def q_step(_, inp):
    q_blk, qs_blk = inp
    b, _, kh, g, h = q_blk.shape

    def k_step(carry, kin):
      m, l, acc = carry
      k_blk, v_blk, ks_blk = kin
      s, mask = _scores(q_blk, k_blk, qs_blk, ks_blk, scale)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      # probabilities in v's dtype before the product, as jax.nn.dot_product_attention does
      pv = jnp.einsum("BKGQS,BSKH->BKGQH", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
      return (m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv), None

    init = (jnp.full((b, kh, g, bq), _NEG, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, h), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(k_step, init, (kb, vb, ksb))
    seen = l > 0
    o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return None, (jnp.einsum("BKGQH->BQKGH", o).astype(q.dtype), lse)

  _, (o, lse) = jax.lax.scan(q_step, None, (_blocks(q, bq), _blocks(qs, bq)))
  return _unblocks(o), jnp.moveaxis(lse, 0, 3).reshape(lse.shape[1:4] + (-1,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, qs, ks, bq, bk, scale):
  return _fwd_blocks(q, k, v, qs, ks, bq, bk, scale)[0]


def _flash_fwd(q, k, v, qs, ks, bq, bk, scale):
  o, lse = _fwd_blocks(q, k, v, qs, ks, bq, bk, scale)
  return o, (q, k, v, qs, ks, o, lse)


def _flash_bwd(bq, bk, scale, res, do):
  """Recomputes each [bq, bk] score block: an outer scan over key blocks (dk, dv of that block), an
  inner scan over query blocks (dq accumulated in float32 into its rows)."""
  q, k, v, qs, ks, o, lse = res
  b, t, kh, g, h = q.shape
  d = jnp.einsum("BQKGH,BQKGH->BKGQ", do.astype(jnp.float32), o.astype(jnp.float32))  # rowsum(dO * O)
  qb, qsb, dob = _blocks(q, bq), _blocks(qs, bq), _blocks(do, bq)
  lseb, db = _blocks(lse, bq, axis=3), _blocks(d, bq, axis=3)

  def k_step(dq, kin):
    k_blk, v_blk, ks_blk = kin

    def q_step(carry, qin):
      dk, dv, dq, i = carry
      q_blk, qs_blk, do_blk, lse_blk, d_blk = qin
      s, mask = _scores(q_blk, k_blk, qs_blk, ks_blk, scale)
      p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)
      dv = dv + jnp.einsum("BKGQS,BQKGH->BSKH", p.astype(do_blk.dtype), do_blk, preferred_element_type=jnp.float32)
      dp = jnp.einsum("BQKGH,BSKH->BKGQS", do_blk, v_blk, preferred_element_type=jnp.float32)
      ds = p * (dp - d_blk[..., None]) * scale
      dk = dk + jnp.einsum("BKGQS,BQKGH->BSKH", ds.astype(q_blk.dtype), q_blk, preferred_element_type=jnp.float32)
      dq_blk = jnp.einsum("BKGQS,BSKH->BQKGH", ds.astype(k_blk.dtype), k_blk, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, 1) + dq_blk,
                                               i * bq, 1)
      return (dk, dv, dq, i + 1), None

    zeros = jnp.zeros(k_blk.shape, jnp.float32)
    (dk, dv, dq, _), _ = jax.lax.scan(q_step, (zeros, zeros, dq, 0), (qb, qsb, dob, lseb, db))
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq, (dk, dv) = jax.lax.scan(k_step, jnp.zeros(q.shape, jnp.float32),
                              (_blocks(k, bk), _blocks(v, bk), _blocks(ks, bk)))
  return dq.astype(q.dtype), _unblocks(dk), _unblocks(dv), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- splash (TPU)

def splash(q, k, v, q_segments, kv_segments, *, block_q: int = 512, block_kv: int = 512, interpret: bool = False):
  """The Pallas Splash kernel (a FullMask with segment ids), one grouped-query kernel per KV head, inside
  shard_map over the mesh's batch and head axes as MaxText runs it. Lengths are padded to whole blocks."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  # the kernel's blocks are whole 128-lane tiles; short sequences are padded up to one
  bq, bk = (-(-min(blk, length) // 128) * 128 for blk, length in ((block_q, t), (block_kv, s)))
  q = _pad_to(q * jnp.asarray(1.0 / math.sqrt(h), q.dtype), bq, 1)  # the kernel does not scale
  qs = _pad_to(q_segments, bq, 1)
  k, v, ks = _pad_to(k, bk, 1), _pad_to(v, bk, 1), _pad_to(kv_segments, bk, 1)
  tp, sp = q.shape[1], k.shape[1]

  def local(q, k, v, qs, ks):
    # q [b, T, K', G, H] -> per (row, KV head) an MQA call over its G query heads
    mask = sm.MultiHeadMask([sm.FullMask((tp, sp))] * g)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    one = lambda q_gth, k_sh, v_sh, qs_t, ks_s: kernel(q_gth, k_sh, v_sh,  # noqa: E731
                                                       segment_ids=sk.SegmentIds(q=qs_t, kv=ks_s))
    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over KV heads
    out = jax.vmap(per_head)(jnp.einsum("BTKGH->BKGTH", q), jnp.einsum("BSKH->BKSH", k),
                             jnp.einsum("BSKH->BKSH", v), qs, ks)
    return jnp.einsum("BKGTH->BTKGH", out)

  q5 = q.reshape(q.shape[0], tp, kh, g, h)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    out = local(q5, k, v, qs, ks)
  else:
    spec_q = shd.logical_to_spec(("activation_batch", None, "activation_kv_heads", None, None), q5.shape, mesh)
    spec_kv = shd.logical_to_spec(shd.BLKH, k.shape, mesh)
    spec_s = jax.P(spec_q[0], None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv, spec_s, jax.P(spec_kv[0], None)),
                        out_specs=spec_q, check_vma=False)(q5, k, v, qs, ks)
  out = out.reshape(b, tp, n, h)[:, :t]
  # padding queries meet padding keys in the kernel, and a query with no key gets a mean: zeros for both
  return _zero_without_key(out, has_key(q_segments, kv_segments), q.dtype)


# ----------------------------------------------------------------------------- Pallas GPU (Triton)

def pallas_gpu(q, k, v, segments, *, block_q: int = 128, block_kv: int = 128, interpret: bool = False):
  """jax.experimental.pallas.ops.gpu.attention.mha: one segment-id array for queries and keys (no cache);
  key/value heads repeated to the query heads (the op has no grouped-query form)."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  b, t, n, h = q.shape
  rep = n // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  blk = min(block_q, block_kv, 128)
  blk = min(blk, -(-t // 16) * 16)  # Triton blocks are multiples of 16; short sequences pad to one
  q, k, v, seg = (_pad_to(x, blk, 1) for x in (q, k, v, segments))  # padding: id 0, zeroed below
  sizes = gpu_attention.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=blk, block_kv_dkv=blk, block_q_dq=blk,
                                   block_kv_dq=blk)
  out = gpu_attention.mha(q, k, v, seg, sm_scale=1.0 / math.sqrt(h), causal=False, block_sizes=sizes,
                          interpret=interpret)[:, :t]
  return _zero_without_key(out, segments > 0, q.dtype)


def numpy_reference(q, k, v, q_segments, kv_segments):
  """Softmax attention in float64 NumPy (tests): the same semantics, an independent computation."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  rep = n // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  qs, ks = np.asarray(q_segments), np.asarray(kv_segments)
  mask = ((qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] > 0))[:, None]
  s = np.where(mask, s, -np.inf)
  mx = np.max(s, -1, keepdims=True)
  p = np.where(mask, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0)
  den = p.sum(-1, keepdims=True)
  p = p / np.where(den > 0, den, 1)
  return np.einsum("bnts,bsnh->btnh", p, v)
