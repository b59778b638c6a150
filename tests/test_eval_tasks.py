"""Task registry: the original's per-task settings (docs/ORIGINAL.md, "Evaluation"), prompts, scoring rules."""
import pytest

from lladav_jax.eval.sample import EvalSample
from lladav_jax.eval.tasks import TASKS, get_task, with_think

MCQ = ["mmmu_val", "mmmu_pro_standard", "mmstar", "ai2d", "seedbench", "mmbench_en_dev", "muirbench", "mme",
       "realworldqa"]
# the tasks' own stops; "<|eot_id|>" follows them in every task (inference.text.stop_list: the original's order)
EXPECTED = {**{t: (2, 2, 2, "no_think", ()) for t in MCQ},
            "chartqa": (16, 16, 16, "no_think", ("\n",)),
            "docvqa_val": (32, 32, 16, "no_think", ()),
            "infovqa_val": (32, 32, 16, "no_think", ()),
            "mathvista_testmini": (96, 96, 48, "think", ()),
            "mathverse_testmini_vision": (64, 64, 32, "think", ()),
            "demo": (8, 8, 8, None, ()),
            "llava_exact_match": (32, 32, 32, None, ()),
            "llava_anls": (32, 32, 32, None, ())}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_original_generation_settings(name):
  t = get_task(name)
  assert (t.gen_length, t.block_length, t.steps, t.think, t.stop_strings) == EXPECTED[name]
  p = t.sampling_params()
  assert (p.gen_length, p.block_length, p.steps, p.stop) == EXPECTED[name][:3] + (EXPECTED[name][4],)
  assert p.temperature == 0.0 and p.remasking == "low_confidence" and p.cfg_scale == 0.0 and p.stop_rule == "original"


def test_registry_is_exactly_the_issue_list():
  assert set(TASKS) == set(EXPECTED)
  with pytest.raises(KeyError, match="known"):
    get_task("videomme")


def s(prompt="q", answers=("A",), choices=("x", "y", "z"), images=("img",), **meta):
  return EvalSample(id="1", prompt_text=prompt, images=list(images), answers=list(answers), choices=list(choices),
                    meta=meta)


def test_prompts():
  assert get_task("seedbench").build_prompt("What?", ["a", "b"]) == (
      "What?\nA. a\nB. b\nAnswer with the option's letter from the given choices directly.")
  assert get_task("mmstar").build_prompt("Q?\nOptions: A: 1, B: 2", ["1", "2"]) == (
      "Q?\nOptions: A: 1, B: 2\nAnswer with the option's letter from the given choices directly")
  assert get_task("mmstar").build_prompt("Q?", ["1", "2"]) == (
      "Q?\nOptions: A: 1, B: 2\nAnswer with the option's letter from the given choices directly")
  assert get_task("chartqa").build_prompt("How many?") == "How many?\nAnswer the question with a single word."
  assert get_task("realworldqa").build_prompt(" Which way? ") == "Which way?"
  assert get_task("mathverse_testmini_vision").build_prompt("q", [], {"query_wo": "full query"}) == "full query"
  assert get_task("mmmu_pro_standard").build_prompt("Q", ["a", "b"]).endswith(
      "B. b\n\nAnswer with the option letter from the given choices directly.")
  assert get_task("mathvista_testmini").build_prompt("Length?", [], {"question_type": "free_form",
      "answer_type": "float", "precision": 2, "unit": "cm"}) == (
      "Length? (Unit: cm)\nAnswer the question using a single floating-point number with two decimal places.")


def test_think_suffix_rules():
  t = get_task("mmmu_val")
  assert t.model_prompt(s("Q")) == "Q /no_think"
  assert t.model_prompt(s("Q", images=())) == "Q"      # original: suffix only on the image branch
  assert get_task("mathvista_testmini").model_prompt(s("Q")) == "Q /think"
  assert get_task("demo").model_prompt(s("Q")) == "Q"
  # the original appends it only where it inserts the image placeholders itself: not when the
  # context already carries "<image>" (llava_onevision_llada.generate_until)
  assert t.model_prompt(s("<image>\nQ")) == "<image>\nQ"
  assert with_think("Q <image>", "think", True) == "Q <image>" and with_think("Q", "think", True) == "Q /think"
  assert with_think("Q", "maybe", True) == "Q"


def test_mmmu_scoring_mc_and_open():
  t = get_task("mmmu_val")
  assert t.score(s(answers=["B"]), "(B)")["score"] == 1.0
  r = t.score(s(answers=["B"]), "not sure")
  assert r["score"] == 0.0 and r["parsed"] is False
  assert t.score(s(answers=["42"], choices=(), question_type="open"), "The answer is 42")["score"] == 1.0
  assert t.score(s(answers=["42"], choices=(), question_type="open"), "It is 41")["score"] == 0.0


def test_realworldqa_letter_and_open_answers():
  t = get_task("realworldqa")
  assert t.score(s(answers=["C"]), "C.")["score"] == 1.0
  assert t.score(s(answers=["3"], choices=()), "three")["score"] == 1.0
  assert t.score(s(answers=["Downhill"], choices=()), "downhill.")["score"] == 1.0
  assert t.score(s(answers=["3"], choices=()), "four")["score"] == 0.0


def test_mathverse_rule_based():
  t = get_task("mathverse_testmini_vision")
  assert t.score(s(answers=["B"], choices=(), question_type="multi-choice"), "so the answer is B")["score"] == 1.0
  assert t.score(s(answers=["12.5"], choices=(), question_type="free-form"), "area = 12.50")["score"] == 1.0
  assert t.score(s(answers=["12.5"], choices=(), question_type="free-form"), "area = 13")["score"] == 0.0


def test_mmbench_aggregate_has_circular_accuracy():
  t = get_task("mmbench_en_dev")
  recs = [{"id": "1", "score": 1.0, "index": 1}, {"id": "2", "score": 0.0, "index": 1000001},
          {"id": "3", "score": 1.0, "index": 2}]
  m = t.aggregate(recs)
  assert m["accuracy"] == pytest.approx(200 / 3) and m["circular_accuracy"] == pytest.approx(50.0)
