"""Model FLOPs (training/flops.py): the attention term counted per segment on packed and padded rows."""
import numpy as np
import pytest

from lladav_jax import config
from lladav_jax.training import flops


def test_attention_pairs_packed_rows():
  seg = np.array([[1, 1, 1, 2, 2, 0, 0, 0],   # two conversations (3 + 2) and 3 padding
                  [1, 1, 1, 1, 1, 1, 1, 1],   # one full row
                  [0, 0, 0, 0, 0, 0, 0, 0],   # all padding
                  [1, 2, 2, 3, 3, 3, 3, 0]])  # three conversations (1 + 2 + 4)
  assert flops.attention_pairs(seg) == (9 + 4) + 64 + 0 + (1 + 4 + 16)
  # non-contiguous ids count by id
  assert flops.attention_pairs(np.array([[1, 2, 1, 2]])) == 8
  with pytest.raises(ValueError):
    flops.attention_pairs(np.ones(4, np.int32))


def test_step_flops_counts_segments_attention_only():
  cfg = config.tiny()
  b, l = 4, 8
  seg = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [1] * 8, [0] * 8, [1, 2, 2, 3, 3, 3, 3, 0]])
  full = flops.step_flops(cfg, batch=b, seq_len=l, tiles=1)
  # None and one full-length segment a row are the same count
  assert flops.step_flops(cfg, batch=b, seq_len=l, tiles=1, attention_pairs=b * l * l) == full
  packed = flops.step_flops(cfg, batch=b, seq_len=l, tiles=1, attention_pairs=flops.attention_pairs(seg))
  llm = cfg.llm
  per_pair = 6 * 2 * llm.num_heads * llm.head_dim * llm.num_layers  # fwd + bwd, QK^T and AV
  assert full["llm"] - packed["llm"] == per_pair * (b * l * l - (13 + 64 + 21))
  assert packed["vision"] == full["vision"] and packed["projector"] == full["projector"]
  assert packed["total"] == packed["llm"] + packed["vision"] + packed["projector"]
  # frozen LLM under a trainable projector still passes gradients: same attention factor
  proj = flops.step_flops(cfg, batch=b, seq_len=l, tiles=1, trainable=("projector",), attention_pairs=0)
  proj_full = flops.step_flops(cfg, batch=b, seq_len=l, tiles=1, trainable=("projector",))
  assert proj_full["llm"] - proj["llm"] == per_pair * b * l * l
