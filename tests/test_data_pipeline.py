"""Batches: exact format and padding, determinism, resume, per-process shards, every source."""
import dataclasses
import json

import numpy as np
import pytest

from lladav_jax.data import arrayrecord, pipeline
from lladav_jax.data.demo_data import demo_data_config, demo_image_config, ensure_demo_data
from lladav_jax.data.tokenizer import Tokenizer
from tests.train_helpers import flat

B = 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return ensure_demo_data(str(tmp_path_factory.getbasetemp() / "demo"), num_train=48, num_val=8, num_test=8)


@pytest.fixture(scope="module")
def tok(demo):
  return Tokenizer.from_dir(demo["tokenizer_dir"])


def train_it(cfg, tok, seed=0, pi=0, pc=1, bs=B):
  return pipeline.build_train_iterator(cfg, tok, demo_image_config(), batch_size_per_process=bs, process_index=pi,
                                       process_count=pc, seed=seed)


def eval_it(cfg, tok, pi=0, pc=1, bs=B):
  return pipeline.build_eval_iterator(cfg, tok, demo_image_config(), batch_size_per_process=bs, process_index=pi,
                                      process_count=pc)


def same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_format(demo, tok):
  cfg = demo_data_config(demo)
  b = flat(next(train_it(cfg, tok)))
  L, T, S = cfg.seq_len, cfg.tile_budget, 56
  spec = {"tokens": ((B, L), np.int32), "labels": ((B, L), np.int32), "segments": ((B, L), np.int32),
          "positions": ((B, L), np.int32), "pixels": ((B, T, S, S, 3), np.uint8),
          "merge_idx": ((B, L, 4), np.int32), "merge_w": ((B, L, 4), np.float32)}
  assert set(b) == set(spec)
  for k, (shape, dt) in spec.items():
    assert b[k].shape == shape and b[k].dtype == dt, k
  assert (b["positions"] == np.arange(L)).all()
  assert ((b["tokens"] == -200) == (b["merge_w"].sum(-1) > 0)).all()  # image tokens <-> merge rows
  assert ((b["merge_idx"] >= 0) & (b["merge_idx"] <= T * 16 + 1)).all()
  assert (b["labels"][b["tokens"] == -200] == -100).all()
  assert (b["tokens"][:, 0] == tok.bos_id).all() and (b["labels"][:, 0] == tok.bos_id).all()
  assert ((b["segments"] > 0)[:, :2].all()) and not (b["segments"] > 0)[:, -1].any()


def test_eos_padding_and_buckets(tok, tmp_path, demo):
  """Rows are EOS-padded (labels EOS) to the longest *pre-expansion* row, as the collator, then
  bucket-padded (pad id, label -100, segment 0); the bucket is the smallest that fits."""
  def r(i, q, a):
    return {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
  recs = [r(0, "Is there a red circle?", "yes"), r(1, "How many shapes are there in the two images?", "two")]
  (tmp_path / "d.json").write_text(json.dumps(recs))
  cfg = demo_data_config(demo).replace(path=str(tmp_path / "d.json"), shuffle=False, buckets=(64, 96, 104))
  b = flat(next(eval_it(cfg, tok, bs=2)))
  lens = [len(tok.encode(x)) for x in ("Is there a red circle?", "How many shapes are there in the two images?")]
  n0 = (b["labels"][0] != -100).sum()
  full1 = int((b["segments"] > 0)[1].sum())  # the longest row: no EOS padding
  extra = lens[1] - lens[0]
  assert b["tokens"].shape[1] == 64 and full1 <= 64
  assert (b["segments"] > 0)[0].sum() == full1  # row 0 padded with EOS up to row 1
  k0 = full1 - extra
  assert (b["tokens"][0, k0:full1] == tok.eos_id).all() and (b["labels"][0, k0:full1] == tok.eos_id).all()
  assert b["tokens"][0, k0 - 1] == tok.eot_id
  assert (b["labels"][:, full1:] == -100).all() and not (b["segments"] > 0)[:, full1:].any()
  assert (b["tokens"][:, full1:] == tok.pad_id).all()
  # switches
  cfg = cfg.replace(labels=dataclasses.replace(cfg.labels, label_eos_padding=False))
  b2 = flat(next(eval_it(cfg, tok, bs=2)))
  assert (b2["tokens"] == b["tokens"]).all() and (b2["labels"][0, k0:full1] == -100).all()
  assert (b2["labels"][0] != -100).sum() == n0 - extra
  cfg = cfg.replace(labels=dataclasses.replace(cfg.labels, pad_with_eos=False))
  b3 = flat(next(eval_it(cfg, tok, bs=2)))
  assert (b3["segments"] > 0)[0].sum() == k0
  # per-device collation with 1 row per device
  cfg = cfg.replace(labels=dataclasses.replace(cfg.labels, pad_with_eos=True), pad_group_size=1)
  b4 = flat(next(eval_it(cfg, tok, bs=2)))
  assert (b4["segments"] > 0)[0].sum() == k0 and (b4["segments"] > 0)[1].sum() == full1


def test_determinism_and_seed(demo, tok):
  cfg = demo_data_config(demo)
  a = [flat(next(it)) for it in [train_it(cfg, tok, seed=3)] for _ in range(3)]
  it = train_it(cfg, tok, seed=3)
  b = [flat(next(it)) for _ in range(3)]
  it = train_it(cfg, tok, seed=4)
  c = [flat(next(it)) for _ in range(3)]
  assert all(same(x, y) for x, y in zip(a, b))
  assert not all(same(x, y) for x, y in zip(a, c))


def test_epochs_reshuffle(demo, tok):
  cfg = demo_data_config(demo)
  it = train_it(cfg, tok, seed=0)
  ids = []
  for _ in range(2 * 48 // B):
    next(it)
    ids += it.last_ids
  e1, e2 = ids[:48], ids[48:]
  assert sorted(e1) == sorted(e2) and len(set(e1)) == 48 and e1 != e2


# workers=2 slow (the CI budget): test_data_bad_inputs resumes 2 grain workers from a checkpoint in the default run
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_mid_epoch(demo, tok, workers):
  cfg = demo_data_config(demo).replace(num_workers=workers)
  it = train_it(cfg, tok, seed=1)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  want = [flat(next(it)) for _ in range(3)]
  it2 = train_it(cfg, tok, seed=1)
  next(it2)  # a fresh iterator somewhere else
  it2.set_state(state)
  got = [flat(next(it2)) for _ in range(3)]
  assert all(same(x, y) for x, y in zip(want, got))
  assert pipeline.iterator_stats(it2)["batches"] == 8
  if workers:
    it.close()
    it2.close()


def test_processes_get_disjoint_shards(demo, tok):
  cfg = demo_data_config(demo)
  ids = []
  for pi in range(2):
    it = train_it(cfg, tok, seed=0, pi=pi, pc=2)
    got = []
    for _ in range(48 // 2 // B):
      next(it)
      got += it.last_ids
    ids.append(got)
  assert not set(ids[0]) & set(ids[1])
  assert len(set(ids[0]) | set(ids[1])) == 48


def test_eval_equal_batches_every_sample_once(demo, tok, tmp_path):
  with open(demo["train"]) as f:
    recs = json.load(f)[:11]
  (tmp_path / "e.json").write_text(json.dumps(recs))
  cfg = demo_data_config(demo).replace(path=str(tmp_path / "e.json"), drop_remainder=False)
  seen, counts = [], []
  for pi in range(2):
    it = eval_it(cfg, tok, pi=pi, pc=2, bs=4)
    n = 0
    for b in map(flat, it):
      n += 1
      real = (b["segments"] > 0).any(1)
      assert real.sum() == len(it.last_ids)
      assert (b["labels"][~real] == -100).all()
      seen += it.last_ids
    counts.append(n)
  assert counts == [2, 2]  # 6 and 5 samples, 4 per batch
  assert sorted(s.split(" ")[0] for s in seen) == sorted(r["id"] for r in recs)


def test_jsonl_yaml_and_brace_sets(demo, tok, tmp_path):
  with open(demo["train"]) as f:
    recs = json.load(f)
  (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:10]))
  (tmp_path / "b.json").write_text(json.dumps(recs[10:30]))
  (tmp_path / "mix.yaml").write_text(
      "datasets:\n  - json_path: a.jsonl\n    sampling_strategy: first:4\n"
      "  - json_path: b.json\n    sampling_strategy: end:25%\n  - json_path: b.json\n    sampling_strategy: random:3\n")
  src = pipeline.records.json_source(str(tmp_path / "mix.yaml"), seed=0)
  keys = [src[i][0] for i in range(len(src))]
  assert keys[:4] == [f"a.jsonl:{i}" for i in range(1, 5)]
  assert keys[4:9] == [f"b.json#{i}" for i in range(15, 20)]
  assert len(keys) == 12 and all(k.startswith("b.json#") for k in keys[9:])
  (tmp_path / "c.json").write_text(json.dumps(recs[30:32]))
  assert len(pipeline.records.json_source(str(tmp_path / "{b,c}.json"))) == 22
  cfg = demo_data_config(demo).replace(path=str(tmp_path / "mix.yaml"))
  assert flat(next(train_it(cfg, tok)))["tokens"].shape == (B, cfg.seq_len)


def test_arrayrecord_matches_json(demo, tok, tmp_path):
  stats = arrayrecord.convert(demo["train"], demo["image_folder"], str(tmp_path / "ar"), shards=3)
  assert stats["shards"] == 3 and stats["missing_files"] == 0
  assert len(arrayrecord.find_shards(str(tmp_path / "ar"))) == 3
  cfg = demo_data_config(demo)
  # images come from the shards
  cfg_ar = demo_data_config(demo).replace(path=str(tmp_path / "ar"), image_folder="/nonexistent")
  a, b = train_it(cfg, tok, seed=5), train_it(cfg_ar, tok, seed=5)
  for _ in range(3):
    assert same(flat(next(a)), flat(next(b)))
  assert arrayrecord.main([demo["validation"], demo["image_folder"], str(tmp_path / "ar2"), "--shards", "2"]) == 0


def test_tfds_source(demo, tok, tmp_path):
  from lladav_jax.data import tfds_source
  tfds_source.prepare_tfds("lladav_demo_test", str(tmp_path / "tfds"), {"validation": demo["validation"]},
                           demo["image_folder"])
  cfg = demo_data_config(demo, "validation").replace(shuffle=False)
  cfg_t = cfg.replace(path="tfds:lladav_demo_test:validation", tfds_data_dir=str(tmp_path / "tfds"), image_folder="")

  def rows(c):
    """Each sample's fields; merge indices past the batch's tiles (its newline, its zero row) relative to the
    batch's tile count, which a neighbour sets (a batch takes the tile bucket of its largest sample)."""
    it = eval_it(c, tok, bs=2)
    out = {}
    for b in map(flat, it):
      past = b["pixels"].shape[1] * 16
      b["merge_idx"] = np.where(b["merge_idx"] >= past, b["merge_idx"] - past - 10 ** 6, b["merge_idx"])
      for i, rid in enumerate(it.last_ids):
        out[rid.split(" ")[0]] = {k: v[i] for k, v in b.items()}
    return out

  # TFDS shuffles examples when it writes them (and batches EOS-pad by neighbours): compare the
  # un-padded part of each sample.
  ref, got = rows(cfg), rows(cfg_t)
  assert ref.keys() == got.keys() and len(ref) == 8
  for k in ref:
    n = int((ref[k]["tokens"] != tok.eos_id).sum() - 0)
    for key in ("tokens", "labels", "merge_idx", "merge_w"):
      np.testing.assert_array_equal(ref[k][key][:n], got[k][key][:n])
    t = min(len(ref[k]["pixels"]), len(got[k]["pixels"]))  # the tiles past t are zeros
    np.testing.assert_array_equal(ref[k]["pixels"][:t], got[k]["pixels"][:t])
    assert not ref[k]["pixels"][t:].any() and not got[k]["pixels"][t:].any()


def test_plain_format_batches(demo, tok, tmp_path):
  recs = [{"id": "p0", "image": "images/train/train-00000.png",
           "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "red circle"}]}]
  (tmp_path / "p.json").write_text(json.dumps(recs))
  cfg = demo_data_config(demo).replace(path=str(tmp_path / "p.json"), format="plain")
  img_cfg = demo_image_config().__class__(image_size=56, patch_size=14, aspect="square")
  b = flat(next(pipeline.build_eval_iterator(cfg, tok, img_cfg, batch_size_per_process=1, process_index=0, process_count=1)))
  n = int((b["segments"] > 0)[0].sum())
  assert n == 16 + 3 and (b["tokens"][0, :16] == -200).all()
  assert tok.decode(b["labels"][0, 16:n]) == "red circle\n" and (b["labels"][0, :16] == -100).all()


def test_batches_become_global_jax_arrays(demo, tok):
  """What the trainer does with a host batch: one global array per key, batch-sharded."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  b = flat(next(train_it(demo_data_config(demo), tok, bs=8)))
  for k, v in b.items():
    arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), v)
    assert arr.shape == v.shape and arr.dtype == v.dtype, k
    np.testing.assert_array_equal(np.asarray(arr), v)
