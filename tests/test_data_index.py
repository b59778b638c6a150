"""JSON / JSONL record indexes: exact record spans, keys, mixes, stale caches, and workers that hold
no records (the pickled source and a spawned worker's memory do not grow with the file)."""
import json
import multiprocessing as mp
import os
import pickle
import random

import cloudpickle
import numpy as np
import pytest

from lladav_jax.data import json_index, records
from lladav_jax.data.records import DataError


def tricky_records(n, seed=0):
  """Strings full of what a naive scanner trips on: quotes, backslash runs, brackets, commas, non-ASCII."""
  rng = random.Random(seed)
  alphabet = 'ab"\\[]{},:\n\t é\u2028😀'
  out = []
  for i in range(n):
    v = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    out.append({"id": i, "conversations": [{"from": "human", "value": v}, {"from": "gpt", "value": v[::-1] + "\\"}],
                "nested": [1, [2, {"k": "]}"}], None, 3.5e-3]})
  return out


@pytest.mark.parametrize("indent,ascii_only", [(None, True), (2, False)])
@pytest.mark.parametrize("chunk", [3, 64, 1 << 20])
def test_json_list_spans_are_exact(tmp_path, monkeypatch, indent, ascii_only, chunk):
  monkeypatch.setattr(json_index, "_CHUNK", chunk)  # records and escapes straddle scan chunks
  recs = tricky_records(150)
  path = tmp_path / "d.json"
  path.write_text(json.dumps(recs, indent=indent, ensure_ascii=ascii_only), encoding="utf-8")
  src = records.json_source(str(path))
  assert len(src) == len(recs)
  for i in range(len(recs)):
    key, raw = src[i]
    assert key == f"d.json#{i}" and json.loads(raw) == recs[i]


def test_jsonl_keys_are_line_numbers_and_blank_lines_are_skipped(tmp_path):
  recs = tricky_records(20)
  lines = ["", json.dumps(recs[0]), " \t", json.dumps(recs[1]), "{not json", "  " + json.dumps(recs[2]), "\x0b"]
  (tmp_path / "d.jsonl").write_text("\n".join(lines))  # no final newline
  src = records.json_source(str(tmp_path / "d.jsonl"))
  assert [src[i][0] for i in range(len(src))] == ["d.jsonl:2", "d.jsonl:4", "d.jsonl:5", "d.jsonl:6"]
  assert json.loads(src[0][1]) == recs[0] and json.loads(src[3][1]) == recs[2]
  with pytest.raises(records.Skip, match="malformed_json"):
    records.parse_record(src[2][1])


@pytest.mark.parametrize("text,match", [("{}", "got an object"), ("[1, 2", "unterminated"), ("[1] [2]", "top-level"),
                                        ("", "empty"), ('["a\\"]', "unterminated"), ("[1] x", "after the list")])
def test_not_a_json_list_is_a_data_error(tmp_path, text, match):
  (tmp_path / "x.json").write_text(text)
  with pytest.raises(DataError, match=match):
    records.json_source(str(tmp_path / "x.json"))


def test_empty_list_and_missing_file(tmp_path):
  (tmp_path / "e.json").write_text(" [ \n ] \n")
  assert len(records.json_source(str(tmp_path / "e.json"))) == 0
  with pytest.raises(DataError, match="not found"):
    records.json_source(str(tmp_path / "nope.json"))


def test_an_edited_file_gets_a_fresh_index(tmp_path):
  path = tmp_path / "d.json"
  path.write_text(json.dumps(tricky_records(5)))
  assert len(records.json_source(str(path))) == 5
  assert len(records.json_source(str(path))) == 5  # read back from the cache
  path.write_text(json.dumps(tricky_records(7)))
  os.utime(path, ns=(1, 1))  # whatever the clock's resolution: a new mtime
  src = records.json_source(str(path))
  assert len(src) == 7 and json.loads(src[6][1])["id"] == 6


def test_mix_random_picks_are_seeded_and_not_pickled(tmp_path):
  (tmp_path / "a.json").write_text(json.dumps(tricky_records(200)))
  (tmp_path / "mix.yaml").write_text("datasets:\n  - json_path: a.json\n    sampling_strategy: random:50%\n"
                                     "  - json_path: a.json\n    sampling_strategy: random:10\n")
  keys = lambda s: [s[i][0] for i in range(len(s))]
  a, b = (records.json_source(str(tmp_path / "mix.yaml"), seed=3) for _ in range(2))
  c = records.json_source(str(tmp_path / "mix.yaml"), seed=4)
  assert len(a) == 110 and keys(a) == keys(b) and keys(a) != keys(c)
  rng = np.random.default_rng(3)  # the expected selection: a permutation per random entry, in order
  want = rng.permutation(200)[:100].tolist() + rng.permutation(200)[:10].tolist()
  assert keys(a) == [f"a.json#{i}" for i in want]
  assert keys(pickle.loads(cloudpickle.dumps(a))) == keys(a)
  assert len(cloudpickle.dumps(a)) < 2048  # paths, not 110 record numbers


def test_unwritable_cache_keeps_the_index_in_memory(tmp_path, monkeypatch):
  (tmp_path / "blocker").write_text("")
  monkeypatch.setenv("LLADAV_JAX_INDEX_DIR", str(tmp_path / "blocker" / "sub"))  # under a file: cannot be made
  (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tricky_records(4)))
  src = pickle.loads(cloudpickle.dumps(records.json_source(str(tmp_path / "d.jsonl"))))
  assert len(src) == 4 and src[3][0] == "d.jsonl:4"


def write_llava_json(path, n):
  rec = {"id": "0", "image": "coco/train2017/000000000000.jpg", "conversations": [
      {"from": "human", "value": "<image>\nWhat is unusual about this image? Describe it in detail, please."},
      {"from": "gpt", "value": "The image shows a man ironing clothes on a board attached to a taxi. " * 12}]}
  with open(path, "w") as f:
    f.write("[")
    for i in range(n):
      rec["id"] = str(i)
      f.write(("," if i else "") + json.dumps(rec))
    f.write("]")
  return os.path.getsize(path)


def _rss_kib():
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _worker(blob, q):
  """What a Grain worker does with the source: unpickle it, then read records at random."""
  before = _rss_kib()
  src = pickle.loads(blob)
  rng = np.random.default_rng(0)
  ids = [json.loads(src[int(i)][1])["id"] for i in rng.integers(0, len(src), 200)]
  q.put((_rss_kib() - before, len(src), len(ids)))


def test_workers_hold_no_records(tmp_path):
  small, large = tmp_path / "small.json", tmp_path / "large.json"
  write_llava_json(small, 1_000)
  size = write_llava_json(large, 80_000)  # ~80 MB: large enough to show if a worker held the records
  assert size > 60e6
  blobs = [cloudpickle.dumps(records.json_source(str(p))) for p in (small, large)]
  assert len(blobs[1]) < 2048 and abs(len(blobs[1]) - len(blobs[0])) < 64
  ctx = mp.get_context("spawn")  # as Grain starts its workers
  q = ctx.Queue()
  p = ctx.Process(target=_worker, args=(blobs[1], q))
  p.start()
  grown_kib, n, read = q.get(timeout=60)
  p.join(30)
  assert n == 80_000 and read == 200
  assert grown_kib < 16 * 1024, f"a worker grew {grown_kib / 1024:.0f} MiB reading a {size / 1e6:.0f} MB file"
