"""The lmms-eval plugin with a fake model and request-like objects (the real harness: tests/test_lmms_cli.py)."""
import re
from types import SimpleNamespace

import pytest
from PIL import Image

from lladav_jax.eval import lmms_plugin as P
from lladav_jax.eval.tasks import EOT

IMG = Image.new("RGB", (4, 4), (0, 0, 255))


class FakeModel:
  def __init__(self, replies=None):
    self.gen_calls, self.elbo_calls = [], []
    self.replies = replies or {}
    self.tokenizer = SimpleNamespace(encode=lambda s, add_special_tokens=False: s.split())

  def generate(self, prompts, images, params):
    self.gen_calls.append({"prompts": list(prompts), "images": images, "params": params})
    return [SimpleNamespace(text=self.replies.get(p, "B."), nfe=1, token_ids=[]) for p in prompts]

  def elbo(self, prompts, images, answers, num_samples, seed=0):
    self.elbo_calls.append({"prompts": prompts, "answers": answers, "num_samples": num_samples, "images": images})
    return [-float(len(a)) for a in answers]


DOCS = {"chartqa": {"test": {0: {"img": IMG, "a": "7"}, 1: {"img": None, "a": "8"}, 2: {"img": IMG, "a": "cat"}}}}


def visual(doc):
  return [doc["img"]] if doc["img"] is not None else []


def req(context, gen_kwargs, doc_id, task="chartqa", split="test"):
  return SimpleNamespace(args=(context, gen_kwargs, visual, doc_id, task, split))


def make(**kw):
  lm = P.LLaDAVJax(model=kw.pop("model", FakeModel()), **kw)
  lm.task_dict = DOCS
  return lm


def test_minimal_base_in_use_exactly_without_lmms_eval():
  import importlib.util
  installed = importlib.util.find_spec("lmms_eval") is not None
  assert P.HAVE_LMMS_EVAL is installed  # CI installs it (the `lmms` extra); a broken install would fall back
  assert issubclass(P.LLaDAVJax, P._MinimalLMMs) is not installed


def test_generate_until_settings_stops_think_and_order():
  model = FakeModel(replies={"Q1 /no_think": "7.", "Q2": "eight"})
  lm = make(model=model, batch_size=2, think_mode="no_think")
  reqs = [req("Q1", {"max_new_tokens": 10, "block_length": 4, "until": ["\n\n"]}, 0),
          req("Q2", {"max_new_tokens": 10, "block_length": 4, "until": ["\n\n"]}, 1),   # no image: no suffix
          req("Q3", {"gen_length": 16, "gen_steps": 8, "until": "ASSISTANT:"}, 2)]
  assert lm.generate_until(reqs) == ["7", "eight", "B"]
  first, second = model.gen_calls
  assert first["prompts"] == ["Q1 /no_think", "Q2"]                # batched, same settings
  assert first["images"] == [[IMG], []]
  p = first["params"]
  assert (p.gen_length, p.block_length, p.steps) == (12, 4, 12)  # 10 rounded up to the block
  assert p.stop == () and p.temperature == 0.0 and p.remasking == "low_confidence"  # eot: stop_list
  kw2 = second["params"]
  assert (kw2.gen_length, kw2.block_length, kw2.steps) == (16, 16, 8)  # original's gen_steps alias
  assert kw2.stop == ()  # `until` ignored by default, as the original


def test_until_honoured_only_when_asked():
  gk = {"until": ["\n\n"], "stopping_criteria": ["\n"]}
  kw = make().sampling_params(gk)[0]
  # its stopping_criteria (inference.text.stop_list adds eot after them) and its stop search (token ids, no text cut)
  assert kw.stop == ("\n",) and kw.stop_rule == "original"
  for flag in (True, "true"):
    assert make(honor_until=flag).sampling_params(gk)[0].stop == ("\n\n", "\n")
  assert make(honor_until=True).sampling_params({"until": "ASSISTANT:"})[0].stop == ("ASSISTANT:",)
  with pytest.raises(ValueError, match="honor_until"):
    make(honor_until="yes")


def test_generation_defaults_and_model_args_defaults():
  lm = make()
  kw, think = lm.sampling_params({})
  assert (kw.gen_length, kw.block_length, kw.steps) == (2, 2, 2) and think is None  # original defaults
  lm = make(gen_length=32, block_length=8, steps=16, threshold=0.9)
  kw, _ = lm.sampling_params({"max_new_tokens": 1024, "stopping_criteria": ["\n"], "think_mode": "think"})
  assert (kw.gen_length, kw.block_length, kw.steps, kw.threshold) == (32, 8, 16, 0.9)
  assert kw.stop == ("\n",)
  with pytest.raises(ValueError, match="number of blocks"):
    lm.sampling_params({"gen_length": 32, "block_length": 8, "steps": 6})


def test_loglikelihood_returns_the_loss():
  model = FakeModel()
  lm = make(model=model, mc_num=16, batch_size=4)
  reqs = [SimpleNamespace(args=("Is it blue?", " yes", visual, 0, "chartqa", "test")),
          SimpleNamespace(args=("Name it.", lambda d: d["a"], visual, 2, "chartqa", "test"))]
  res = lm.loglikelihood(reqs)
  assert res == [(4.0, False), (3.0, False)]  # -ELBO: lmms-eval picks the argmin
  call = model.elbo_calls[0]
  assert call["answers"] == [" yes", "cat"] and call["num_samples"] == 16 and call["images"][0] == [IMG]


def test_loglikelihood_greedy_check():
  model = FakeModel(replies={"Say it": "two words"})
  lm = make(model=model, check_greedy=True)
  res = lm.loglikelihood([SimpleNamespace(args=("Say it", "two words", visual, 0, "chartqa", "test")),
                          SimpleNamespace(args=("Say it", "other thing", visual, 0, "chartqa", "test"))])
  assert [g for _, g in res] == [True, False]
  assert model.gen_calls[0]["params"].gen_length == 2  # two tokens in the fake tokenizer


def test_create_from_arg_string_and_bad_args():
  lm = P.LLaDAVJax.create_from_arg_string("pretrained=/ckpt,batch_size=4,think_mode=no_think,steps=8,conv_template=llava_llada")
  assert lm.batch_size == 4 and lm.think_mode == "no_think" and lm.defaults["steps"] == 8 and lm.pretrained == "/ckpt"
  with pytest.raises(TypeError, match="typo_arg"):
    P.LLaDAVJax(model=FakeModel(), typo_arg=1)
  with pytest.raises(ValueError, match="pretrained"):
    P.LLaDAVJax()


def gray_frames(n):
  return [Image.new("L", (8, 6), 20 * i) for i in range(n)]


def write_gif(path, n):
  first, *rest = gray_frames(n)
  first.save(path, save_all=True, append_images=rest, duration=40, loop=0)
  return path


def levels(frames):
  """Each frame's gray level, i.e. which source frame it is (frame i has level 20 * i)."""
  return [f.convert("RGB").getpixel((0, 0))[0] // 20 for f in frames]


def video_lm(path, **kw):
  model = FakeModel()
  lm = make(model=model, **kw)
  lm.task_dict = {"v": {"test": {0: {"video": str(path)}}}}
  return lm, model, SimpleNamespace(args=("What happens?", {}, lambda d: [d["video"]], 0, "v", "test"))


def test_gif_video_uniformly_sampled_frames_reach_the_model_as_one_video(tmp_path):
  path = write_gif(tmp_path / "clip.gif", 10)
  lm, model, r = video_lm(path, max_frames_num=4, think_mode="no_think")
  assert lm.generate_until([r]) == ["B"]
  call = model.gen_calls[0]
  assert call["prompts"] == ["What happens? /no_think"]  # a visual is present: the think suffix
  (visuals,) = call["images"]
  assert len(visuals) == 1 and isinstance(visuals[0], list)  # one video = one list of frames
  assert levels(visuals[0]) == [0, 3, 6, 9]  # np.linspace(0, 9, 4, dtype=int)
  assert all(f.mode == "RGB" and f.size == (8, 6) for f in visuals[0])
  lm, model, r = video_lm(path)  # the default, 32 as the original: short videos repeat frames
  lm.generate_until([r])
  got = levels(model.gen_calls[0]["images"][0][0])
  assert len(got) == 32 and got[0] == 0 and got[-1] == 9 and got == sorted(got)


def test_video_frame_directory_sorted_and_sampled(tmp_path):
  for i, f in reversed(list(enumerate(gray_frames(5)))):  # written out of order: sorted by name
    f.save(tmp_path / f"frame_{i:03d}.png")
  (tmp_path / "notes.txt").write_text("not a frame")
  lm, model, r = video_lm(tmp_path, max_frames_num=3)
  lm.generate_until([r])
  assert levels(model.gen_calls[0]["images"][0][0]) == [0, 2, 4]
  lm.loglikelihood([SimpleNamespace(args=("What happens?", " x", lambda d: [d["video"]], 0, "v", "test"))])
  assert levels(model.elbo_calls[0]["images"][0][0]) == [0, 2, 4]  # the ELBO path gets the video too


def test_missing_or_unreadable_video_names_the_path(tmp_path):
  missing = tmp_path / "nope.mp4"
  lm, _, r = video_lm(missing)
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    lm.generate_until([r])
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"not a video")
  lm, _, r = video_lm(bad)
  with pytest.raises((ImportError, ValueError), match=re.escape(str(bad))):  # no PyAV: says to install it
    lm.generate_until([r])
  good = write_gif(tmp_path / "good.gif", 10).read_bytes()
  broken = tmp_path / "broken.gif"
  for data in (b"GIF89a-truncated", good[:-5]):  # a broken header, a truncated last frame
    broken.write_bytes(data)
    lm, _, r = video_lm(broken)
    with pytest.raises(ValueError, match=re.escape(str(broken))):
      lm.generate_until([r])
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  lm, _, r = video_lm(empty)
  with pytest.raises(ValueError, match=re.escape(str(empty))):
    lm.generate_until([r])
  lm.task_dict = {"v": {"test": {0: {}}}}
  two = SimpleNamespace(args=("q", {}, lambda d: [str(bad), IMG], 0, "v", "test"))
  with pytest.raises(ValueError, match="only visual"):
    lm.generate_until([two])


class EchoModel(FakeModel):
  """Answers 'ans(<prompt>)', so a later round's context shows which answers reached it."""

  def generate(self, prompts, images, params):
    self.gen_calls.append({"prompts": list(prompts), "images": images, "params": params})
    return [SimpleNamespace(text=f"ans({p})", nfe=1, token_ids=[]) for p in prompts]


def test_generate_until_multi_round_rounds_context_and_order():
  calls = []

  def doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                  previous_round_info=None):  # lmms-eval's multi-round doc_to_text
    calls.append((doc["q"], round_idx, list(previous_output), previous_round_info))
    if round_idx == doc["rounds"]:
      return None, None, True, doc.get("final", previous_output), None
    ctx = f"{doc['q']}{round_idx} after [{'; '.join(previous_output)}]"
    return [IMG], ctx, False, previous_output, {"round": round_idx}

  docs = {"a": {"q": "A", "rounds": 3}, "b": {"q": "B", "rounds": 1}, "c": {"q": "C", "rounds": 1, "final": ["kept"]}}
  model = EchoModel()
  lm = make(model=model, batch_size=4)
  lm.task_dict = {"mr": {"test": docs}}
  gk = {"gen_length": 8, "until": ["\n\n"]}
  reqs = [SimpleNamespace(args=(docs[k]["q"], dict(gk), lambda d: [], doc_to_text, k, "mr", "test")) for k in "abc"]
  res = lm.generate_until_multi_round(reqs)
  a1 = "A1 after [ans(A)]"
  a2 = f"A2 after [ans(A); ans({a1})]"
  assert res == [["ans(A)", f"ans({a1})", f"ans({a2})"], ["ans(B)"], ["kept"]]  # lists, request order
  assert [c["prompts"] for c in model.gen_calls] == [["A", "B", "C"], [a1], [a2]]  # 3 rounds; live ones batched
  assert model.gen_calls[0]["images"] == [[], [], []] and model.gen_calls[1]["images"] == [[IMG]]
  kw = model.gen_calls[1]["params"]  # generate_until's settings path every round
  assert kw.gen_length == 8 and kw.stop == ()
  assert ("A", 2, ["ans(A)", f"ans({a1})"], {"round": 1}) in calls  # previous answers and round info
  assert [c[:2] for c in calls if c[0] == "A"] == [("A", 1), ("A", 2), ("A", 3)]


def test_pyproject_registers_the_manifest_entry_point():
  import os
  root = os.path.dirname(os.path.dirname(os.path.dirname(P.__file__)))
  text = open(os.path.join(root, "pyproject.toml")).read()
  assert '[project.entry-points."lmms_eval.models"]' in text
  assert 'lladav_jax = "lladav_jax.eval.lmms_plugin:lmms_eval_manifest"' in text
  assert callable(P.lmms_eval_manifest)


def test_registers_with_lmms_eval_when_importable(monkeypatch):
  """With an lmms_eval providing the real interface (an ABC + register_model), the plugin
  subclasses it, registers as 'lladav_jax', and can be instantiated (all abstract methods there)."""
  import abc
  import importlib.util
  import sys
  import types

  registry = {}

  class lmms(abc.ABC):  # the abstract surface of lmms_eval.api.model.lmms
    def __init__(self):
      self._rank, self._world_size, self.task_dict = 0, 1, {}

    @abc.abstractmethod
    def loglikelihood(self, requests): ...

    @abc.abstractmethod
    def generate_until(self, requests): ...

    @abc.abstractmethod
    def generate_until_multi_round(self, requests): ...

  def register_model(*names):
    def deco(cls):
      assert issubclass(cls, lmms)
      for n in names:
        registry[n] = cls
      return cls
    return deco

  mods = {"lmms_eval": types.ModuleType("lmms_eval"), "lmms_eval.api": types.ModuleType("lmms_eval.api"),
          "lmms_eval.api.model": types.ModuleType("lmms_eval.api.model"),
          "lmms_eval.api.registry": types.ModuleType("lmms_eval.api.registry")}
  mods["lmms_eval.api.model"].lmms = lmms
  mods["lmms_eval.api.registry"].register_model = register_model
  for k, v in mods.items():
    monkeypatch.setitem(sys.modules, k, v)
  spec = importlib.util.spec_from_file_location("lmms_plugin_with_lmms_eval", P.__file__)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.HAVE_LMMS_EVAL is True
  assert registry["lladav_jax"] is mod.LLaDAVJax and issubclass(mod.LLaDAVJax, lmms)
  lm = mod.LLaDAVJax(model=FakeModel())
  lm.task_dict = DOCS
  assert lm.generate_until([req("Q", {}, 0)]) == ["B"]


def test_engine_gets_the_task_stops_then_eot_once(tmp_path, monkeypatch):
  """chartqa's stop through the plugin and the eval CLI reaches the engine as exactly ["\\n", eot] tokenised (the
  original's order: its stopping_criteria, then eot once); repeated stops are dropped (inference.text.stop_list)."""
  from lladav_jax import config
  from lladav_jax.inference import SamplingParams, generation
  from lladav_jax.data.demo_data import ensure_demo_data
  from lladav_jax.data.tokenizer import Tokenizer
  from lladav_jax.eval import run as R
  from lladav_jax.eval.sample import EvalSample
  from tests.models import random_model

  tok = Tokenizer.from_dir(ensure_demo_data(str(tmp_path), num_train=1, num_val=1, num_test=1)["tokenizer_dir"])
  model = random_model(config.tiny(vocab_size=tok.vocab_size, mask_token_id=tok.mask_id), tokenizer=tok)
  handed, real = [], generation.prepare_inputs

  class Captured(Exception):
    pass

  def capture(*a, **kw):  # the engine's stop arrays of row 0, then no engine run (nothing to compile)
    inputs = real(*a, **kw)
    handed.append([inputs.stop_ids[0, k, :n].tolist() for k, n in enumerate(inputs.stop_lens[0]) if n])
    raise Captured

  monkeypatch.setattr(generation, "prepare_inputs", capture)
  want = [tok.encode("\n"), [tok.eot_id]]
  gk = {"until": ["\n"], "stopping_criteria": ["\n"], "gen_length": 16, "steps": 16}
  for honor_until in (False, True):  # with until, "\n" comes twice: once to the engine
    lm = make(model=model, honor_until=honor_until)
    with pytest.raises(Captured):
      lm.generate_until([req("Q", gk, 1)])
  with pytest.raises(Captured):
    R.evaluate("chartqa", [EvalSample(id="a", prompt_text="Q", images=[], answers=["1"])], model.generate)
  with pytest.raises(Captured):  # a caller's eot and repeats: kept once, in their first place
    model.generate(["Q"], params=SamplingParams(gen_length=16, stop=("\n", EOT, "\n")))
  assert handed == [want] * 4
  with pytest.raises(Captured):
    model.generate(["Q"], params=SamplingParams(gen_length=16, stop=(EOT, "\n")))
  assert handed[-1] == want[::-1]
