"""Host memory of an eval over large pages: peak RSS growth of reading a DocVQA-style TSV (N rows, one
2000 x 2000 page each: 12 MB as RGB) and running evaluate() over it, and of the lmms-eval plugin's
generate_until over N requests whose doc_to_visual decodes a page. The model is a stand-in that only
looks at the pixels: the figures are the harness's own memory, what it holds besides the model.

    python bench/eval_memory.py [--rows 300] [--before DIR] [--before-rows 300]

--before DIR: also measure another checkout (e.g. `git archive <commit> | tar -x -C /tmp/before`, the
code that decoded every image up front) and print both; --before-rows caps its rows (it holds every
decoded page: ~15 MB a row).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hwm_mib() -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def measure(kind: str, tsv: str, png_path: str, rows: int) -> dict:
  """In a fresh process (one per checkout and path): peak RSS growth and wall time."""
  from types import SimpleNamespace

  from PIL import Image
  size = Image.open(png_path).size

  def touch(images):  # the stand-in model reads every pixel row's first pixel
    for per_prompt in images:
      for im in per_prompt:
        assert im.size == size and im.getpixel((0, 0)) == (255, 255, 255)

  base, t = _hwm_mib(), time.perf_counter()
  if kind == "evaluate":
    from lladav_jax.eval import run
    from lladav_jax.eval.readers import read_samples
    from lladav_jax.eval.tasks import get_task
    task = get_task("docvqa_val")
    rr = read_samples(tsv, task, limit=rows)

    def generate(prompts, images, **kw):
      touch(images)
      return ["x"] * len(prompts)

    n = run.evaluate(task, rr.samples, generate, batch_size=8, skipped=rr.skipped)["num_samples"]
  else:
    from lladav_jax.eval import lmms_plugin
    with open(png_path, "rb") as f:  # an HF dataset holds encoded bytes and decodes on access, as doc_to_visual here
      png = f.read()

    class Model:
      def generate(self, prompts, images, **kw):
        touch(images)
        return ["x"] * len(prompts)

    lm = lmms_plugin.LLaDAVJax(model=Model(), batch_size=8)
    lm.task_dict = {"docvqa": {"val": {i: {"image": png} for i in range(rows)}}}
    visual = lambda doc: [Image.open(io.BytesIO(doc["image"])).convert("RGB")]
    n = len(lm.generate_until([SimpleNamespace(args=("What is the title?", {}, visual, i, "docvqa", "val"))
                               for i in range(rows)]))
  return {"rows": n, "seconds": time.perf_counter() - t, "peak_gib": (_hwm_mib() - base) / 1024}


def run_one(tree: str, kind: str, tsv: str, png: str, rows: int) -> dict:
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", kind, tsv, png, str(rows)],
                       env=dict(os.environ, PYTHONPATH=tree), check=True, capture_output=True, text=True, cwd=tree)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", type=int, default=300)
  ap.add_argument("--before", default="", help="another checkout to measure too (decoding up front)")
  ap.add_argument("--before-rows", type=int, default=0, help="rows for --before (default: --rows)")
  ap.add_argument("--measure", nargs=4, default=None, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.measure:  # a child process: the tree under test comes first on sys.path (PYTHONPATH)
    kind, tsv, png, rows = a.measure
    print(json.dumps(measure(kind, tsv, png, int(rows))))
    return
  sys.path.append(ROOT)  # the pages of tests/test_eval_memory.py (only here: a child imports the tree it measures)
  from tests.test_eval_memory import PAGE, page_png, write_docvqa_tsv
  tmp = tempfile.mkdtemp(prefix="bench_eval_")
  png = os.path.join(tmp, "page.png")
  with open(png, "wb") as f:
    f.write(page_png())
  with open(png, "rb") as f:
    tsv = write_docvqa_tsv(os.path.join(tmp, "pages.tsv"), a.rows, f.read())
  print(f"{tsv}: {a.rows} rows of {PAGE}x{PAGE} pages ({PAGE * PAGE * 3 / 2**20:.1f} MiB each as RGB), "
        f"{os.path.getsize(tsv) / 2**20:.1f} MiB on disk")
  runs = ([("before", os.path.abspath(a.before), a.before_rows or a.rows)] if a.before else []) + \
      [("this tree", ROOT, a.rows)]
  table = [["source", "path", "rows", "seconds", "peak +GiB", "peak +MiB/row"]]
  for name, tree, rows in runs:
    for kind in ("evaluate", "plugin"):
      r = run_one(tree, kind, tsv, png, rows)
      table.append([name, "read_samples + evaluate" if kind == "evaluate" else "lmms plugin generate_until",
                    str(r["rows"]), f"{r['seconds']:.1f}", f"{r['peak_gib']:.3f}",
                    f"{r['peak_gib'] * 1024 / r['rows']:.2f}"])
  widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
  for row in table:
    print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
  main()
