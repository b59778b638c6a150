"""Eval memory: benchmark images stay encoded until their batch runs (readers -> evaluate, and the lmms-eval
plugin), so resident memory does not grow with the number of rows; a page that fails to decode then is
reported, not scored."""
import base64
import csv
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw

from lladav_jax.eval import lmms_plugin as P
from lladav_jax.eval import readers as R
from lladav_jax.eval import run
from lladav_jax.eval.tasks import get_task

PAGE = 2000  # a scanned page: 2000 x 2000 px, 12 MB as RGB


def page_png(n=PAGE) -> bytes:
  """A grayscale 'document page' (lines of text as bars): small as PNG, 12 MB decoded to RGB."""
  im = Image.new("L", (n, n), 255)
  d = ImageDraw.Draw(im)
  for y in range(100, n - 100, 120):
    d.rectangle((100, y, n - 100, y + 18), fill=0)
  buf = io.BytesIO()
  im.save(buf, "PNG", compress_level=1)
  return buf.getvalue()


def write_docvqa_tsv(path, rows: int, image: bytes, bad_rows=()) -> str:
  b64 = base64.b64encode(image).decode()
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t")
    w.writerow(["index", "question", "answer", "image"])
    for i in range(rows):
      img = base64.b64encode(image[:len(image) // 2]).decode() if i in bad_rows else b64
      w.writerow([str(i), f"What is the title of page {i}?", "x", img])
  return str(path)


def _kib(field):
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure(tsv: str) -> None:
  """In a fresh process: read + evaluate the file; prints the peak RSS growth (MiB) and the rows scored."""
  def generate(prompts, images, params):
    for per_prompt in images:
      (im,) = per_prompt
      assert isinstance(im, Image.Image) and im.size == (PAGE, PAGE) and im.getpixel((0, 0)) == (255, 255, 255)
    return ["x"] * len(prompts)

  base = _kib("VmHWM")
  task = get_task("docvqa_val")
  rr = R.read_samples(tsv, task)
  res = run.evaluate(task, rr.samples, generate, batch_size=4, skipped=rr.skipped)
  print((_kib("VmHWM") - base) / 1024, res["num_samples"])


def peak_growth_mib(tsv: str) -> tuple[float, int]:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                     os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, __file__, tsv], env=env, check=True, capture_output=True, text=True)
  mib, n = out.stdout.split()
  return float(mib), int(n)


@pytest.mark.slow  # ~35 s on 2 cores (a subprocess eval per row count); the CI budget
def test_memory_is_flat_in_the_number_of_rows(tmp_path):
  image = page_png()
  few = peak_growth_mib(write_docvqa_tsv(tmp_path / "few.tsv", 20, image))
  many = peak_growth_mib(write_docvqa_tsv(tmp_path / "many.tsv", 300, image))
  assert few[1] == 20 and many[1] == 300
  page_mib = PAGE * PAGE * 3 / 2**20
  # a batch at a time holds the same few pages whatever the row count (decoding up front would hold every page)
  assert many[0] - few[0] < 5 * page_mib, f"{few[0]:.0f} MiB for 20 rows, {many[0]:.0f} MiB for 300"


def test_a_page_that_fails_to_decode_is_reported_not_scored(tmp_path):
  image = page_png(64)
  tsv = write_docvqa_tsv(tmp_path / "d.tsv", 5, image, bad_rows={2})  # half a PNG: its header reads fine
  task = get_task("docvqa_val")
  rr = R.read_samples(tsv, task)
  assert len(rr.samples) == 5 and not rr.skipped and rr.samples[2].images[0].size == (64, 64)
  calls = []

  def generate(prompts, images, params):
    calls.append([len(p) for p in images])
    return ["x" if "page 1?" in p else "y" for p in prompts]

  res = run.evaluate(task, rr.samples, generate, batch_size=4, skipped=rr.skipped)
  assert [p["id"] for p in res["predictions"]] == ["0", "1", "3", "4"]
  assert res["num_skipped"] == 1 and res["skipped"][0]["id"] == "2" and "decod" in res["skipped"][0]["reason"]
  assert calls == [[1, 1, 1, 1], [1]]  # the call keeps its size; the bad row's output is dropped
  assert res["metrics"]["anls"] == 25.0  # 1 of the 4 scored rows right: the bad one is not scored as 0


def test_rows_sharing_an_image_share_one_reference(tmp_path):
  b64 = base64.b64encode(page_png(32)).decode()
  path = tmp_path / "m.tsv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t")
    w.writerows([["index", "question", "answer", "image"], ["1", "q1", "a", b64], ["2", "q2", "b", "1"],
                 ["3", "q3", "c", "1"]])
  s1, s2, s3 = R.read_samples(str(path), get_task("docvqa_val")).samples
  assert isinstance(s1.images[0], R.ImageRef) and s1.images[0] is s2.images[0] is s3.images[0]
  assert s1.images[0].load().size == (32, 32)


def test_plugin_builds_visuals_one_batch_at_a_time():
  img = Image.new("RGB", (4, 4), (0, 0, 255))
  built = []

  def doc_to_visual(doc):
    built.append(doc["i"])
    return [img]

  class Model:
    def __init__(self):
      self.built_at_call = []

    def generate(self, prompts, images, params):
      self.built_at_call.append(len(built))
      assert all(v == [img] for v in images)
      return ["a"] * len(prompts)

    def elbo(self, prompts, images, answers, num_samples, seed=0):
      self.built_at_call.append(len(built))
      return [0.0] * len(prompts)

  model = Model()
  lm = P.LLaDAVJax(model=model, batch_size=2)
  lm.task_dict = {"t": {"test": {i: {"i": i} for i in range(6)}}}
  assert lm.generate_until([SimpleNamespace(args=("q", {}, doc_to_visual, i, "t", "test")) for i in range(6)]) == ["a"] * 6
  assert model.built_at_call == [2, 4, 6]
  built.clear()
  lm.loglikelihood([SimpleNamespace(args=("q", " a", doc_to_visual, i, "t", "test")) for i in range(5)])
  assert model.built_at_call[3:] == [2, 4, 5]


if __name__ == "__main__":
  _measure(sys.argv[1])
