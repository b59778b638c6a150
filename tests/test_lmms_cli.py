"""The plugin through the real lmms-eval CLI (the `lmms` extra; docs/EVAL.md), offline: local JSON tasks written
here (`dataset_path: json`, `--include_path`), the tiny released-layout checkpoint of tests/released.py, one CLI
process for the three request types, and assertions on lmms-eval's own output files (results and samples).

Skipped when lmms_eval is not importable, unless LLADAV_REQUIRE_LMMS=1 (CI sets it: there it must run)."""
import glob
import importlib.util
import json
import os
import subprocess

import numpy as np
import pytest

if importlib.util.find_spec("lmms_eval") is None:  # before the heavy imports: a skip costs nothing
  if os.environ.get("LLADAV_REQUIRE_LMMS") == "1":
    raise ImportError("LLADAV_REQUIRE_LMMS=1 but lmms_eval is not importable: pip install -e .[lmms] "
                      "and lmms-eval with --no-deps (docs/EVAL.md)")
  pytest.skip("lmms_eval is not installed (docs/EVAL.md)", allow_module_level=True)

from PIL import Image  # noqa: E402

from lladav_jax import LLaDAV  # noqa: E402
from lladav_jax.eval import answers as ans  # noqa: E402
from lladav_jax.eval.tasks import EOT  # noqa: E402
from lladav_jax.inference import SamplingParams  # noqa: E402
from tests.released import write_released_checkpoint  # noqa: E402
from tests.train_helpers import PYTHON, inference_env  # noqa: E402

GEN = dict(gen_length=8, block_length=8, steps=8)
MC_NUM = 8
# gen: one image question, one text-only; mc: text-only (an image's 729+ positions exceed the tiny model's 256)
GEN_DOCS = [{"question": "What color is the shape?", "image": "wide.png"},
            {"question": "How many shapes are there?", "image": None}]
MC_QUESTIONS = ["What shape is the object?", "What color is the shape?"]
POOL = ["square", "red", "circle", "green", "six", "three"]
MR_DOCS = [{"question": "What shape is the object?"}, {"question": "Is there a red circle?"}]

UTILS = '''
from PIL import Image


def doc_to_visual(doc):
  return [Image.open(doc["image"]).convert("RGB")] if doc.get("image") else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
  return doc["question"]


def gen_results(doc, results):
  return {"exact": float(results[0].strip() == doc["expected"])}


def mr_doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                   previous_round_info=None):
  if round_idx is None:  # the first round's context
    return doc["question"]
  if round_idx == 2:
    return None, None, True, previous_output, None
  return [], doc["question"] + " You said: " + previous_output[-1], False, previous_output, {"round": round_idx}


def mr_results(doc, results):
  (rounds,) = results
  return {"rounds": float(isinstance(rounds, list) and rounds == doc["expected"])}
'''


def task_yaml(name, data, output_type, doc_to_text, target, metric, *extra):
  """A local lmms-eval task over a JSONL file (no hub), metric `metric` averaged."""
  lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
           "test_split: test", f"output_type: {output_type}", "doc_to_visual: !function utils.doc_to_visual",
           f"doc_to_text: !function utils.{doc_to_text}", f"doc_to_target: {target}", *extra,
           "metric_list:", f"  - metric: {metric}", "    aggregation: mean", "    higher_is_better: true"]
  return "\n".join(lines) + "\n"


def write_jsonl(path, docs):
  with open(path, "w") as f:
    f.writelines(json.dumps(d) + "\n" for d in docs)
  return path


def direct(model, prompts, images):
  """What the plugin must answer: LLaDAV.generate with the task's settings, stops `<|eot_id|>` only."""
  outs = model.generate(prompts, images, SamplingParams(**GEN, stop=(EOT,)))
  return [ans.postprocess_output(o.text) for o in outs]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lmms")
  _, ckpt = write_released_checkpoint(str(root / "LLaDA-V"))
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (200, 300, 3), np.uint8)).save(root / "wide.png")
  model = LLaDAV.from_pretrained(ckpt, dtype="float32")

  gen_docs = [dict(d, image=str(root / d["image"]) if d["image"] else None) for d in GEN_DOCS]
  imgs = [[Image.open(d["image"])] if d["image"] else [] for d in gen_docs]
  for d, a in zip(gen_docs, direct(model, [d["question"] for d in gen_docs], imgs)):
    d["expected"] = a

  # Multiple choice: the label is the pool's most likely word under the model (the ELBO of " word", the
  # continuation lmms-eval builds), the distractors the three least likely: a sign error scores 0.
  mc_docs, margins = [], []
  for q in MC_QUESTIONS:
    elbo = np.array(model.elbo([q] * len(POOL), None, [" " + w for w in POOL], num_samples=MC_NUM))
    order = np.argsort(-elbo)
    picked = [order[0], *order[-3:]]
    perm = rng.permutation(4)  # the label lands at a random index
    mc_docs.append({"question": q, "choices": [POOL[picked[i]] for i in perm], "label": int(np.argmin(perm))})
    margins.append(elbo[order[0]] - elbo[order[-3]])

  qs = [d["question"] for d in MR_DOCS]
  firsts = direct(model, qs, [[] for _ in qs])
  seconds = direct(model, [q + " You said: " + a for q, a in zip(qs, firsts)], [[] for _ in qs])
  rounds = [dict(d, expected=[a, b]) for d, a, b in zip(MR_DOCS, firsts, seconds)]

  tasks = root / "tasks"
  tasks.mkdir()
  (tasks / "utils.py").write_text(UTILS)
  gen_kwargs = ["generation_kwargs:", *[f"  {k}: {v}" for k, v in GEN.items()]]
  (tasks / "gen.yaml").write_text(task_yaml("lladav_gen", write_jsonl(root / "gen.jsonl", gen_docs), "generate_until",
                                            "doc_to_text", "expected", "exact", *gen_kwargs,
                                            "process_results: !function utils.gen_results"))
  (tasks / "mc.yaml").write_text(task_yaml("lladav_mc", write_jsonl(root / "mc.jsonl", mc_docs), "multiple_choice",
                                           "doc_to_text", "label", "acc", "doc_to_choice: choices"))
  (tasks / "mr.yaml").write_text(task_yaml("lladav_mr", write_jsonl(root / "mr.jsonl", rounds),
                                           "generate_until_multi_round", "mr_doc_to_text", "expected", "rounds",
                                           *gen_kwargs, "process_results: !function utils.mr_results"))

  out = root / "out"
  env = inference_env()
  env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf"), TOKENIZERS_PARALLELISM="false")
  r = subprocess.run([PYTHON, "-m", "lmms_eval", "--model", "lladav_jax",
                      "--model_args", f"pretrained={ckpt},dtype=float32,mc_num={MC_NUM}",
                      "--tasks", "lladav_gen,lladav_mc,lladav_mr", "--include_path", str(tasks),
                      "--batch_size", "2", "--output_path", str(out), "--log_samples"],
                     cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  found = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
  assert len(found) == 1, (found, r.stderr[-4000:])
  results = json.load(open(found[0]))["results"]

  def samples(task):
    (path,) = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
    return [json.loads(line) for line in open(path)]

  return dict(results=results, samples=samples, gen=gen_docs, mc=mc_docs, margins=margins, mr=rounds,
              stderr=r.stderr)


def test_generate_until_answers_equal_generate(run):
  assert run["results"]["lladav_gen"]["exact,none"] == 1.0, run["stderr"][-3000:]
  got = {s["doc_id"]: s["filtered_resps"][0] for s in run["samples"]("lladav_gen")}
  assert [got[i] for i in range(len(run["gen"]))] == [d["expected"] for d in run["gen"]]


def test_multiple_choice_picks_the_most_likely_choice(run):
  assert min(run["margins"]) > 2.0  # the label is far more likely than any distractor (nats)
  assert run["results"]["lladav_mc"]["acc,none"] == 1.0
  for s in run["samples"]("lladav_mc"):  # the plugin's answers: losses, the label's the smallest
    losses = [float(loss) for loss, _ in s["filtered_resps"]]
    assert int(np.argmin(losses)) == run["mc"][s["doc_id"]]["label"] and min(losses) > 0


def test_multi_round_task_receives_the_list_of_rounds(run):
  assert run["results"]["lladav_mr"]["rounds,none"] == 1.0
  got = {s["doc_id"]: s["filtered_resps"][0] for s in run["samples"]("lladav_mr")}
  assert [got[i] for i in range(len(run["mr"]))] == [d["expected"] for d in run["mr"]]
