"""evaluate() end to end with fake generate functions: known accuracies, settings passed to the
model, stop handling, multi-process merge, sweeps, the CLI and the trainer hook."""
import json
import os
from types import SimpleNamespace

import pytest
from PIL import Image

from lladav_jax.eval import run as R
from lladav_jax.eval.__main__ import main
from lladav_jax.data.demo_data import ensure_demo_data, qa_items
from lladav_jax.eval.sample import EvalSample
from lladav_jax.eval.tasks import get_task

IMG = Image.new("RGB", (4, 4), (255, 0, 0))


def out(text, nfe=2):
  return SimpleNamespace(text=text, nfe=nfe, token_ids=[1] * 3)


class Recorder:
  """Fake LLaDAV.generate: answers from a table keyed by prompt, records every call."""

  def __init__(self, reply):
    self.reply, self.calls = reply, []

  def __call__(self, prompts, images, params):
    self.calls.append({"prompts": list(prompts), "images": images, "params": params})
    return [out(self.reply(p)) for p in prompts]


def mcq_samples(n=4):
  return [EvalSample(id=str(i), prompt_text=f"Q{i}?\nA. x\nB. y", images=[IMG], answers=["A" if i % 2 else "B"],
                     choices=["x", "y"], meta={"category": "c1" if i < 2 else "c2"}) for i in range(n)]


def test_evaluate_mcq_known_accuracy_and_settings():
  samples = mcq_samples(4)
  gold = {s.prompt_text: s.answers[0] for s in samples}
  # right for samples 0 and 1, wrong letter for 2, unparseable for 3
  replies = {0: lambda g: g + ".", 1: lambda g: f"The answer is {g}", 2: lambda g: "A" if g == "B" else "B",
             3: lambda g: "hmm"}
  def reply(prompt):
    i = int(prompt[1])
    return replies[i](gold[prompt.removesuffix(" /no_think")])
  gen = Recorder(reply)
  res = R.evaluate("ai2d", samples, gen, batch_size=3, skipped=[{"id": "9", "row": 10, "reason": "bad"}])
  assert res["metrics"]["accuracy"] == pytest.approx(50.0)
  assert res["metrics"]["num_unparsed"] == 1
  assert res["metrics"]["per_category"] == {"c1": 100.0, "c2": 0.0}
  assert res["num_samples"] == 4 and res["num_skipped"] == 1 and res["skipped"][0]["id"] == "9"
  assert [p["score"] for p in res["predictions"]] == [1.0, 1.0, 0.0, 0.0]
  assert res["predictions"][0]["prediction"] == "B"       # trailing '.' stripped as the original
  assert res["nfe"] == {"mean": 2.0, "total": 8}
  # the original's MCQ settings reach the model, in batches of 3 then 1
  assert [len(c["prompts"]) for c in gen.calls] == [3, 1]
  p = gen.calls[0]["params"]
  assert (p.gen_length, p.block_length, p.steps) == (2, 2, 2)
  assert p.temperature == 0.0 and p.remasking == "low_confidence"
  assert p.stop == ()  # the task's own stops: none; eot is added once by inference.text.stop_list
  assert gen.calls[0]["prompts"][0].endswith(" /no_think")
  assert gen.calls[0]["images"][0] == [IMG]


def test_think_suffix_only_with_images_and_per_task():
  gen = Recorder(lambda p: "1")
  no_img = EvalSample(id="t", prompt_text="2-1?", images=[], answers=["1"])
  with_img = EvalSample(id="i", prompt_text="count?", images=[IMG], answers=["1"], meta={"answer_type": "integer"})
  R.evaluate("mathvista_testmini", [no_img, with_img], gen, batch_size=2)
  assert gen.calls[0]["prompts"] == ["2-1?", "count? /think"]
  assert gen.calls[0]["params"].gen_length == 96 and gen.calls[0]["params"].steps == 48
  gen2 = Recorder(lambda p: "x")
  R.evaluate("demo", [with_img], gen2)
  assert gen2.calls[0]["prompts"] == ["count?"]
  assert gen2.calls[0]["params"].steps == 8


def test_chartqa_stop_newline_and_relaxed_accuracy():
  samples = [EvalSample(id="a", prompt_text="q1", images=[IMG], answers=["100"]),
             EvalSample(id="b", prompt_text="q2", images=[IMG], answers=["12%"]),
             EvalSample(id="c", prompt_text="q3", images=[IMG], answers=["Asia"])]
  replies = {"q1 /no_think": "104", "q2 /no_think": "0.12", "q3 /no_think": "Europe"}
  gen = Recorder(lambda p: replies[p])
  res = R.evaluate("chartqa", samples, gen, batch_size=3)
  assert "\n" in gen.calls[0]["params"].stop and gen.calls[0]["params"].stop_rule == "original"
  assert res["predictions"][0]["prediction"] == "104"
  assert res["metrics"]["relaxed_accuracy"] == pytest.approx(200 / 3)


def test_docvqa_anls_through_evaluate():
  samples = [EvalSample(id="a", prompt_text="q", images=[IMG], answers=["hello"])]
  res = R.evaluate("docvqa_val", samples, Recorder(lambda p: "helo"))
  assert res["metrics"]["anls"] == pytest.approx(80.0)
  assert res["config"]["gen_length"] == 32 and res["config"]["steps"] == 16


def test_mme_scores_through_evaluate():
  s = [EvalSample(id=str(i), prompt_text=f"q{i}", images=[IMG], answers=[a],
                  meta={"category": "count", "pair_id": "p0" if i < 2 else "p1"})
       for i, a in enumerate(["Yes", "No", "Yes", "No"])]
  res = R.evaluate("mme", s, Recorder(lambda p: "Yes"))
  # each pair half right: (50 + 0) per pair -> category 50
  assert res["metrics"]["perception"] == pytest.approx(50.0)
  assert res["metrics"]["cognition"] == 0.0


def test_overrides_and_schedule_validation():
  gen = Recorder(lambda p: "A")
  R.evaluate("ai2d", mcq_samples(1), gen, overrides={"gen_length": 8, "block_length": 4, "steps": 4,
                                                     "threshold": 0.9, "cache": "none"})
  p = gen.calls[0]["params"]
  assert (p.gen_length, p.block_length, p.steps, p.threshold, p.cache) == (8, 4, 4, 0.9, None)
  with pytest.raises(ValueError, match="multiple of the number of blocks"):
    R.evaluate("ai2d", mcq_samples(1), gen, overrides={"gen_length": 32, "block_length": 16, "steps": 3})
  with pytest.raises(ValueError, match="block_length"):
    R.evaluate("ai2d", mcq_samples(1), gen, overrides={"gen_length": 30, "block_length": 16})


def test_wrong_output_count_is_an_error():
  with pytest.raises(RuntimeError, match="1 outputs for 2 prompts"):
    R.evaluate("ai2d", mcq_samples(2), lambda p, i, params: [out("A")], batch_size=2)


def test_two_processes_merge_and_equal_call_counts(tmp_path):
  samples = mcq_samples(5)
  right = {s.prompt_text + " /no_think": s.answers[0] for s in samples}
  gens = [Recorder(lambda p: right[p]) for _ in range(2)]
  nb = R.num_batches_for(len(samples), 2, 2)
  shard_dir = str(tmp_path / "shards")
  kw = dict(batch_size=2, process_count=2, num_batches=nb, shard_dir=shard_dir, merge_timeout_s=5)
  assert R.evaluate("ai2d", samples, gens[1], process_index=1, **kw) is None  # not process 0
  res = R.evaluate("ai2d", samples, gens[0], process_index=0, **kw)
  assert res["num_samples"] == 5 and res["metrics"]["accuracy"] == 100.0
  assert [p["id"] for p in res["predictions"]] == ["0", "1", "2", "3", "4"]
  # process 0 has 3 samples, process 1 has 2: both make the same number of full-size calls
  assert len(gens[0].calls) == len(gens[1].calls) == nb == 2
  assert all(len(c["prompts"]) == 2 for g in gens for c in g.calls)
  assert os.path.exists(os.path.join(shard_dir, "process_00001.jsonl.done"))


def test_merge_times_out_when_a_shard_is_missing(tmp_path):
  with pytest.raises(TimeoutError, match="processes \\[1\\]"):
    R.evaluate("ai2d", mcq_samples(2), Recorder(lambda p: "A"), process_index=0, process_count=2,
               shard_dir=str(tmp_path), merge_timeout_s=0.1)


def test_sweep_and_plot(tmp_path):
  samples = mcq_samples(4)
  def gen(prompts, images, params):  # more steps -> right more often
    steps = params.steps
    return [out("A" if (steps >= 8 or i == 0) else "B", nfe=steps) for i, _ in enumerate(prompts)]
  sw = R.run_sweep(get_task("ai2d"), samples, gen, "gen_length", [8], base_overrides={"block_length": 8, "steps": 8})
  assert sw["runs"][0]["config"]["gen_length"] == 8
  sw = R.run_sweep(get_task("ai2d"), samples, gen, "steps", [2, 8], base_overrides={"gen_length": 8, "block_length": 8})
  table = R.sweep_table(sw)
  assert [r["value"] for r in table] == [2, 8] and [r["nfe"] for r in table] == [2, 8]
  assert table[0]["accuracy"] == 50.0 and table[1]["accuracy"] == 50.0
  from lladav_jax.eval.plots import plot_sweep
  png = plot_sweep(sw, str(tmp_path / "sweep.png"))
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert "steps=2" in R.format_summary(sw)


def test_parse_sweep():
  assert R.parse_sweep("steps=4,8,16") == ("steps", [4, 8, 16])
  assert R.parse_sweep("threshold=0.9, 0.7") == ("threshold", [0.9, 0.7])
  for bad in ("steps", "bogus=1,2", "steps="):
    with pytest.raises(ValueError):
      R.parse_sweep(bad)


@pytest.fixture(scope="module")
def demo_test(tmp_path_factory):
  return ensure_demo_data(str(tmp_path_factory.mktemp("demo")), num_train=4, num_val=2, num_test=6)["test"]


def test_cli_end_to_end_with_fake_model(tmp_path, capsys, demo_test):
  items = qa_items(demo_test)
  truth = {it["question"]: it["answer"] for it in items}  # questions repeat: the last answer wins
  right = set(list(truth)[::2])  # the fake model answers every other question
  def gen(prompts, images, params):
    return [out(next((truth[q] for q in right if q in p), "blob"), nfe=params.steps) for p in prompts]
  expected = 100.0 * sum(it["question"] in right and truth[it["question"]] == it["answer"] for it in items) / len(items)
  assert 0 < expected < 100
  output = str(tmp_path / "res" / "demo.json")
  res = main(["--checkpoint", "/ckpt", "--task", "demo", "--data", demo_test, "--batch_size", "4", "--steps", "64",
              "--output", output], generate_fn=gen)
  saved = json.load(open(output))
  assert saved["metrics"]["exact_match"] == pytest.approx(expected)
  assert saved["checkpoint"] == "/ckpt" and saved["config"]["steps"] == 64 and saved["nfe"]["mean"] == 64
  assert len(saved["predictions"]) == len(items) and saved["num_skipped"] == 0
  assert res["metrics"] == saved["metrics"]
  printed = capsys.readouterr().out
  assert "exact_match" in printed and "demo" in printed
  main(["--checkpoint", "/ckpt", "--task", "demo", "--data", demo_test, "--limit", "2", "--sweep", "steps=32,128",
        "--output", output], generate_fn=gen)
  saved = json.load(open(output))
  assert [r["config"]["steps"] for r in saved["runs"]] == [32, 128] and saved["runs"][0]["num_samples"] == 2
  assert os.path.exists(str(tmp_path / "res" / "demo_sweep.png"))


def test_evaluate_during_training(demo_test):
  items = qa_items(demo_test)[:4]
  model = SimpleNamespace(generate=lambda prompts, images, params: [out(items[0]["answer"]) for _ in prompts])
  logs = R.evaluate_during_training(model, ["demo"], {"demo": demo_test}, limit=4, batch_size=2)
  expected = 100.0 * sum(it["answer"] == items[0]["answer"] for it in items) / 4
  assert logs["eval/demo/exact_match"] == pytest.approx(expected)
  assert logs["eval/demo/nfe"] == 2.0 and logs["eval/demo/num_skipped"] == 0.0
