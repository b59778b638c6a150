"""Each class of bad input is skipped and counted by reason (never mangled, never fatal until
max_skip_fraction); the counters survive worker processes and checkpoints."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from lladav_jax.data import pipeline
from lladav_jax.data.demo_data import demo_image_config, ensure_demo_data
from lladav_jax.data.records import DataError
from lladav_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = ensure_demo_data(str(tmp_path_factory.getbasetemp() / "demo"), num_train=48, num_val=8, num_test=8)
  return Tokenizer.from_dir(d["tokenizer_dir"])


@pytest.fixture()
def folder(tmp_path):
  Image.new("RGB", (56, 56), (255, 0, 0)).save(tmp_path / "good.png")
  Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "big.png")
  Image.new("RGB", (40, 40), (0, 255, 0)).save(tmp_path / "mid.png")
  (tmp_path / "corrupt.png").write_bytes(os.urandom(300))
  b = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(b, "PNG")
  (tmp_path / "truncated.png").write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
  (tmp_path / "empty.png").write_bytes(b"")
  return tmp_path


def cfg_for(folder, **kw):
  cfg = pipeline.DataConfig(path=str(folder / "data.jsonl"), image_folder=str(folder), seq_len=160, tile_budget=2)
  return cfg.replace(**kw)


def run(tok, folder, record, **kw):
  proc = pipeline.SampleProcessor(tok, demo_image_config(), cfg_for(folder, **kw))
  raw = record if isinstance(record, bytes) else json.dumps(record).encode()
  return proc(("data.jsonl:7", raw))


def rec(image="good.png", q="<image>\nWhat color is the circle?", a="red", **extra):
  r = {"id": "x1", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], **extra}
  if image is not None:
    r["image"] = image
  return r


def test_good_sample_is_kept(tok, folder):
  out = run(tok, folder, rec())
  assert isinstance(out, pipeline.Sample) and out.id == "x1 (data.jsonl:7)"


def test_missing_image(tok, folder):
  out = run(tok, folder, rec("nope.png"))
  assert out.reason == "missing_image" and "nope.png" in out.detail and out.id.startswith("x1")


def test_corrupt_image(tok, folder):
  assert run(tok, folder, rec("corrupt.png")).reason == "corrupt_image"


def test_truncated_image(tok, folder):
  out = run(tok, folder, rec("truncated.png"))
  assert out.reason == "corrupt_image" and "truncated" in out.detail
  # the original's ImageFile.LOAD_TRUNCATED_IMAGES = True behaviour, behind a switch
  assert isinstance(run(tok, folder, rec("truncated.png"), allow_truncated_images=True), pipeline.Sample)


def test_zero_size_image(tok, folder):
  assert run(tok, folder, rec("empty.png")).reason == "zero_size_image"
  arr = rec("a.png")
  arr["_arrays"] = {"a.png": np.zeros((0, 5, 3), np.uint8)}
  proc = pipeline.SampleProcessor(tok, demo_image_config(), cfg_for(folder))
  assert proc(("k", arr)).reason == "zero_size_image"  # a decoded (TFDS) array with no pixels


def test_decompression_bomb(tok, folder, monkeypatch):
  out = run(tok, folder, rec("big.png"), max_image_pixels=1000)  # our limit: checked on the header
  assert out.reason == "decompression_bomb" and "4096" in out.detail
  # PIL's own limit: its DecompressionBombWarning (> limit) is turned into an error, and its
  # DecompressionBombError (> 2x limit) is caught; both are counted as decompression_bomb.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  assert run(tok, folder, rec("mid.png")).reason == "decompression_bomb"  # 1600 px: the warning
  assert run(tok, folder, rec("big.png")).reason == "decompression_bomb"  # 4096 px: the error


def test_malformed_json_line(tok, folder):
  out = run(tok, folder, b'{"id": "x1", "conversations": [')
  assert out.reason == "malformed_json" and out.id == "data.jsonl:7"
  assert run(tok, folder, b"[1, 2]").reason == "malformed_json"


def test_no_answer_turn(tok, folder):
  r = rec()
  r["conversations"] = r["conversations"][:1]
  assert run(tok, folder, r).reason == "no_answer"
  assert run(tok, folder, {"id": "x", "conversations": []}).reason == "bad_record"


def test_image_tag_count_mismatch(tok, folder):
  assert run(tok, folder, rec(q="<image> <image>\nWhat?")).reason == "image_tag_mismatch"
  assert run(tok, folder, rec(q="What?")).reason == "image_tag_mismatch"
  assert run(tok, folder, rec(image=None)).reason == "image_tag_mismatch"  # text only with a tag
  assert run(tok, folder, rec(["good.png", "good.png"])).reason == "image_tag_mismatch"


def test_too_long_after_expansion(tok, folder):
  full = run(tok, folder, rec()).expanded.tokens
  last_img = int(np.nonzero(full == -200)[0][-1])
  # the image fits, the whole sample does not: the original truncates the text after expansion
  out = run(tok, folder, rec(), seq_len=len(full) - 3)
  assert isinstance(out, pipeline.Sample) and len(out.expanded.tokens) == len(full) - 3
  np.testing.assert_array_equal(out.expanded.tokens, full[:len(full) - 3])
  assert run(tok, folder, rec(), seq_len=len(full) - 3, truncate=False).reason == "too_long"
  # the image itself would be cut: skipped, never a partial image
  out = run(tok, folder, rec(), seq_len=last_img)
  assert out.reason == "too_long" and "after image expansion" in out.detail
  assert isinstance(run(tok, folder, rec(), seq_len=last_img + 1), pipeline.Sample)
  # a text-only sample over seq_len: truncated as the original (labels remain), or skipped
  long = {"id": "t", "conversations": [{"from": "human", "value": "yes " * 200}, {"from": "gpt", "value": "no"}]}
  assert len(run(tok, folder, long, seq_len=64).expanded.tokens) == 64
  assert run(tok, folder, long, seq_len=64, truncate=False).reason == "too_long"


def test_truncation_leaving_no_labels(tok, folder):
  plain = {"id": "p", "image": "good.png", "conversations": [{"from": "human", "value": "<image>"},
                                                             {"from": "gpt", "value": ""}]}
  cfg = cfg_for(folder, seq_len=16, format="plain")
  img_cfg = demo_image_config().__class__(image_size=56, patch_size=14, aspect="square")  # stage 1: 16 tokens
  proc = pipeline.SampleProcessor(tok, img_cfg, cfg)
  out = proc(("k", json.dumps(plain).encode()))  # <image>(16) + "\n" -> 17 -> cut to 16: nothing labelled
  assert out.reason == "no_labels"
  cfg = cfg.replace(seq_len=17)
  proc = pipeline.SampleProcessor(tok, img_cfg, cfg)
  assert isinstance(proc(("k", json.dumps(plain).encode())), pipeline.Sample)


def _write(folder, recs):
  with open(folder / "data.jsonl", "w") as f:
    for r in recs:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


BAD = [rec("nope.png"), rec("corrupt.png"), "{not json", rec(q="What?")]
REASONS = {"missing_image": 1, "corrupt_image": 1, "malformed_json": 1, "image_tag_mismatch": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_counts_survive_workers_and_checkpoints(tok, folder, workers):
  recs = [dict(rec(), id=f"g{i}") for i in range(8)] + BAD
  _write(folder, recs)
  cfg = cfg_for(folder, num_workers=workers, max_skip_fraction=0.5, skip_check_min_samples=4, shuffle=False)
  it = pipeline.build_eval_iterator(cfg, tok, demo_image_config(), batch_size_per_process=4, process_index=0,
                                    process_count=1)
  batches = list(it)
  stats = pipeline.iterator_stats(it)
  it.close()
  assert len(batches) == 3 and stats["seen"] == 12 and stats["used"] == 8
  assert stats["by_reason"] == REASONS
  assert stats["skipped_ids"]["malformed_json"] == ["data.jsonl:11"]
  assert stats["skipped_ids"]["missing_image"] == ["x1 (data.jsonl:9)"]
  # the last batch: no real rows left -> padding rows (eval keeps equal batch counts per process)
  assert not batches[2].inputs.valid.any() and (batches[2].labels == -100).all()


def test_too_many_skips_raise_with_counts_and_ids(tok, folder):
  _write(folder, [dict(rec(), id=f"g{i}") for i in range(4)] + BAD * 2)
  cfg = cfg_for(folder, max_skip_fraction=0.2, skip_check_min_samples=6, shuffle=False)
  it = pipeline.build_train_iterator(cfg, tok, demo_image_config(), batch_size_per_process=2, process_index=0,
                                     process_count=1, seed=0)
  next(it)
  next(it)
  state = it.get_state()
  with pytest.raises(DataError, match=r"skipped.*max_skip_fraction=0\.2.*missing_image.*x1 \(data\.jsonl:5\)"):
    for _ in range(10):
      next(it)
  # counters are part of the checkpoint
  it2 = pipeline.build_train_iterator(cfg, tok, demo_image_config(), batch_size_per_process=2, process_index=0,
                                      process_count=1, seed=0)
  it2.set_state(state)
  assert pipeline.iterator_stats(it2)["seen"] == state["seen"] == 4


@pytest.mark.parametrize("packing", [False, True])
def test_resume_across_skips_is_exact(tok, folder, packing):
  """A checkpoint taken before skipped records (packed: with a sample held for the next batch) resumes to
  the same batches, the same skip counts and ids: skips are read once, counted once."""
  from tests.train_helpers import flat
  recs = []
  for i in range(12):  # a bad record after every third good one
    recs += [dict(rec(), id=f"g{i}")] + ([BAD[i // 3]] if i % 3 == 1 else [])
  _write(folder, recs)
  rows = dict(packing=True, seq_len=320, buckets=(320,), tile_budget=8) if packing else {}  # packed: several a row
  cfg = cfg_for(folder, max_skip_fraction=0.5, skip_check_min_samples=4, shuffle=False, **rows)

  def make():
    return pipeline.build_train_iterator(cfg, tok, demo_image_config(), batch_size_per_process=2, process_index=0,
                                         process_count=1, seed=0)

  it = make()
  next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  assert (it._pending is not None) == packing
  want = [(flat(next(it)), list(it.last_ids)) for _ in range(5)]
  stats = pipeline.iterator_stats(it)
  assert stats["skipped"] > sum(state["skipped"].values())  # skips were crossed after the checkpoint
  it2 = make()
  it2.set_state(state)
  got = [(flat(next(it2)), list(it2.last_ids)) for _ in range(5)]
  assert [ids for _, ids in got] == [ids for _, ids in want]
  assert all(np.array_equal(w[k], g[k]) for (w, _), (g, _) in zip(want, got) for k in w)
  assert pipeline.iterator_stats(it2) == stats
