"""lmms-eval model plugin `lladav_jax`: runs lmms-eval tasks on the JAX LLaDA-V.

    lmms-eval --model lladav_jax --model_args pretrained=/ckpt,batch_size=8,think_mode=no_think \
        --tasks chartqa --gen_kwargs gen_length=16,block_length=16,steps=16

lmms-eval finds the class through the `lmms_eval.models` entry point in pyproject.toml (`lmms-eval models`
does not list entry-point plugins); install it with the `lmms` extra (docs/EVAL.md: versions, recipe).
Without lmms-eval the class stands on a minimal base with the same surface, so it can be tested and used
with request-like objects (`.args` tuples).

Request handling follows the original (`llava_onevision_llada.py`): `loglikelihood` returns the loss
(the negative ELBO: lmms-eval's multiple choice picks the argmin; `LLaDAV.elbo` gives the ELBO itself),
and gen_kwargs `until` is ignored (only "stopping_criteria" and "<|eot_id|>" stop, which keeps
MathVista's multi-paragraph answers; model_arg honor_until=true adds `until` to the stops). The plugin
passes the task's own stops; "<|eot_id|>" is added once after them by inference.text.stop_list.
Video tasks (doc_to_visual gives a path) get `max_frames_num` uniformly sampled frames, passed to
the model as one video: a per-prompt visual that is a list of frames (one placeholder, the frames
pooled by `multimodal.process_video`, as the original). Multi-round tasks follow lmms-eval's
`generate_until_multi_round` contract (the task's doc_to_text drives the rounds; the result is a list of
round answers). A request's visuals are built (doc_to_visual called, its video read) only when its batch
runs, so one batch's pixels are in memory at a time, never the benchmark's.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from PIL import Image

from lladav_jax.api import LLaDAV
from lladav_jax.data import records
from lladav_jax.multimodal import to_rgb
from lladav_jax.eval import answers as ans
from lladav_jax.inference import SamplingParams
from lladav_jax.eval import tasks


def _convert(v: str) -> Any:
  low = v.lower()
  if low in ("true", "false"):
    return low == "true"
  if low == "none":
    return None
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return v


def _flag(name: str, v) -> bool:
  """A boolean model_arg: a bool, or "true"/"false" as lmms-eval's arg string gives it."""
  if isinstance(v, bool):
    return v
  if isinstance(v, str) and v.lower() in ("true", "false"):
    return v.lower() == "true"
  raise ValueError(f"lladav_jax model_arg {name} must be true or false, got {v!r}")


def uniform_indices(n: int, num: int) -> list[int]:
  """The original's load_video sampling: `num` indices spread over [0, n - 1] (repeats when n < num)."""
  return np.linspace(0, n - 1, num, dtype=int).tolist()


def read_video(path: str, max_frames_num: int = 32) -> list[Image.Image]:
  """`max_frames_num` uniformly sampled RGB frames of a video: a directory of image files (sorted
  by name), or a file decoded as the training data's videos are (`records.decode_video`)."""
  def pick(total, fps):
    return uniform_indices(total, max_frames_num)

  # the harness's own files: absolute paths allowed (relative ones made absolute); empty files are a Skip
  opener = records.Opener({}, None, allow_absolute_paths=True)
  path = os.path.abspath(path)
  try:
    if os.path.isdir(path):
      exts = Image.registered_extensions()
      files = sorted(f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in exts)
      if not files:
        raise ValueError(f"video directory has no image files: {path}")
      refs = [os.path.join(path, files[i]) for i in pick(len(files), 0)]
      frames = [records.open_image(opener.data(r, "video"), r, max_pixels=Image.MAX_IMAGE_PIXELS) for r in refs]
    elif os.path.isfile(path):
      with opener.open(path, "video") as f:
        frames = records.decode_video(f, path, pick, max_pixels=Image.MAX_IMAGE_PIXELS)
    else:
      raise FileNotFoundError(f"video not found: {path}")
  except records.Skip as e:
    raise ValueError(f"cannot read video {path}: {e}") from None
  return [to_rgb(f) for f in frames]


class _MinimalLMMs:
  """The part of lmms_eval.api.model.lmms the plugin uses, for environments without lmms-eval."""

  def __init__(self) -> None:
    self._rank, self._world_size, self.task_dict = 0, 1, {}

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    args = {k.strip(): _convert(v.strip()) for k, v in (kv.split("=", 1) for kv in arg_string.split(",") if kv.strip())}
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**args, **extra)

  @property
  def rank(self) -> int:
    return self._rank

  @property
  def world_size(self) -> int:
    return self._world_size


def _lmms_api():
  try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
    return lmms, register_model, True
  except Exception:  # not installed, or a broken install: the minimal base still works
    return _MinimalLMMs, (lambda *names: (lambda cls: cls)), False


_Base, _register_model, HAVE_LMMS_EVAL = _lmms_api()


@_register_model("lladav_jax")
class LLaDAVJax(_Base):
  """lmms-eval model over `LLaDAV.generate` / `LLaDAV.elbo`.

  Model args: pretrained (checkpoint dir), batch_size, think_mode ("think" | "no_think" | None),
  default gen_length / block_length / steps / threshold / cache (per-request gen_kwargs win),
  mc_num (ELBO Monte-Carlo samples), check_greedy, max_frames_num (frames per video, 32 as the
  original), dtype (parameters and compute; default float16, as the original evaluates), seed,
  honor_until (stop at gen_kwargs `until` too; default False: ignored, as the original).
  `model=` injects a loaded model.
  """

  def __init__(self, pretrained: str = "", batch_size: int = 1, think_mode: str | None = None,
               gen_length: int | None = None, block_length: int | None = None, steps: int | None = None,
               threshold: float | None = None, cache: str | None = None, mc_num: int = 128,
               check_greedy: bool = False, max_frames_num: int = 32, dtype: str | None = "float16", seed: int = 0,
               honor_until: bool = False, model=None, **kwargs) -> None:
    super().__init__()
    unknown = set(kwargs) - {"device", "device_map", "conv_template", "model_name", "attn_implementation"}
    if unknown:  # torch-only args of the original are accepted and ignored; anything else is a typo
      raise TypeError(f"unexpected model_args for lladav_jax: {sorted(unknown)}")
    self.pretrained, self.batch_size_per_device = pretrained, int(batch_size)
    self.think_mode, self.mc_num = think_mode, int(mc_num)
    self.check_greedy = _flag("check_greedy", check_greedy)
    self.max_frames_num, self.honor_until = int(max_frames_num), _flag("honor_until", honor_until)
    if self.max_frames_num < 1:
      raise ValueError(f"max_frames_num must be >= 1, got {max_frames_num}")
    self.defaults = {"gen_length": gen_length, "block_length": block_length, "steps": steps,
                     "threshold": threshold, "cache": cache}
    self.dtype, self.seed, self._model = dtype, int(seed), model
    if self._model is None and not pretrained:
      raise ValueError("lladav_jax needs model_args pretrained=<checkpoint dir>")
    if model is None:
      self._rank, self._world_size = jax.process_index(), jax.process_count()

  @property
  def model(self):
    if self._model is None:
      self._model = LLaDAV.from_pretrained(self.pretrained, **({"dtype": self.dtype} if self.dtype else {}))
    return self._model

  @property
  def batch_size(self) -> int:
    return self.batch_size_per_device

  # ---------------------------------------------------------------- settings
  def sampling_params(self, gen_kwargs: dict | None) -> tuple[SamplingParams, str | None]:
    """lmms-eval gen_kwargs -> SamplingParams, and the think mode.

    gen_length: "gen_length", else the model_args default, else max_new_tokens, else 2 (the
    original's default); rounded up to a multiple of block_length. block_length defaults to
    gen_length (one block, as every original setting). steps ("steps" or the original's
    "gen_steps") defaults to gen_length. Stops: "stopping_criteria", and `until` before it only with
    honor_until (lmms-eval fills it with "\n\n" when a task names none; the original ignores it);
    "<|eot_id|>" follows them and repeats are dropped, both in inference.text.stop_list.
    """
    gk = dict(gen_kwargs or {})
    d = self.defaults
    block = gk.get("block_length") or d["block_length"]
    gen = gk.get("gen_length") or d["gen_length"] or gk.get("max_new_tokens") or 2
    gen, block = int(gen), int(block) if block else None
    block = min(block, gen) if block else gen
    gen = math.ceil(gen / block) * block
    steps = int(gk.get("steps") or gk.get("gen_steps") or d["steps"] or gen)
    stops = []
    for key in ("until", "stopping_criteria")[0 if self.honor_until else 1:]:
      v = gk.get(key)
      stops += [v] if isinstance(v, str) else list(v or [])
    stops = [s for s in stops if s]
    temperature = float(gk.get("temperature") or 0.0)  # lmms-eval tasks use 0 / do_sample False
    params = SamplingParams(gen_length=gen, block_length=block, steps=steps, temperature=temperature,
                            remasking=gk.get("remasking", "low_confidence"),
                            cfg_scale=float(gk.get("cfg_scale", 0.0)),  # the original's "cfg" never reached it
                            threshold=gk.get("threshold", d["threshold"]), cache=gk.get("cache", d["cache"]),
                            stop=tuple(stops), stop_rule="original", seed=self.seed)  # searched as the original
    return params.validate(), gk.get("think_mode", self.think_mode)

  def _visuals(self, doc_to_visual, doc_id, task, split):
    """The request's visuals, to be built when its batch runs (doc_to_visual decodes images, a video
    path is read into frames): built up front, a benchmark's every image would be in memory at once."""
    def build():
      vis = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
      return self._model_visuals(vis)
    return build

  def _model_visuals(self, vis) -> list:
    """lmms-eval visuals -> the model's per-prompt list: PIL images, or one video (a path, read
    into a list of sampled frames), as the original's single video placeholder."""
    vis = [v for v in (vis or []) if v is not None]
    if any(isinstance(v, str) for v in vis):
      if len(vis) != 1:
        raise ValueError(f"lladav_jax: a video must be the sample's only visual, got {len(vis)} visuals")
      return [read_video(vis[0], self.max_frames_num)]
    return [v.convert("RGB") if hasattr(v, "convert") and v.mode != "RGB" else v for v in vis]  # RGB: no copy

  def _prepare(self, context: str, gen_kwargs, visuals):
    """One prompt: (context, visuals (a list, or a callable that builds it), SamplingParams, think mode)."""
    params, think = self.sampling_params(gen_kwargs)
    return context, visuals, params, think

  def _generate(self, prepared: list) -> list[str]:
    """Prepared prompts -> cleaned answers in the same order; same-settings prompts are batched, and
    each batch's visuals are built just before its call."""
    groups: dict[SamplingParams, list[int]] = {}
    for i, (_, _, params, _) in enumerate(prepared):
      groups.setdefault(params, []).append(i)
    res: list[str | None] = [None] * len(prepared)
    for params, idxs in groups.items():
      for s in range(0, len(idxs), self.batch_size):
        chunk = idxs[s:s + self.batch_size]
        images = [_built(prepared[i][1]) for i in chunk]
        prompts = [tasks.with_think(prepared[i][0], prepared[i][3], bool(im)) for i, im in zip(chunk, images)]
        outs = self.model.generate(prompts, images, params)
        del images  # freed before the next batch is built, not after
        for i, out in zip(chunk, outs):
          text = out if isinstance(out, str) else out.text
          res[i] = ans.postprocess_output(text)  # stops are token ids (no text cut), as the original
    return res

  # ---------------------------------------------------------------- lmms-eval API
  def generate_until(self, requests) -> list[str]:
    """args: (context, gen_kwargs, doc_to_visual, doc_id, task, split). Same-settings requests
    are batched; results come back in request order."""
    prepared = []
    for req in requests:
      context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
      prepared.append(self._prepare(context, gen_kwargs, self._visuals(doc_to_visual, doc_id, task, split)))
    return self._generate(prepared)

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    """args: (context, doc_to_target, doc_to_visual, doc_id, task, split) -> (loss, is_greedy).

    The loss is the negative ELBO (an upper bound of -log p(continuation | context)), as the original and
    lmms-eval's own models return: multiple choice picks the argmin of it (every lmms-eval from 0.5 on).
    """
    items = []
    for req in requests:
      context, target, doc_to_visual, doc_id, task, split = req.args[:6]
      cont = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
      items.append((context, self._visuals(doc_to_visual, doc_id, task, split), str(cont)))
    out: list[tuple[float, bool]] = []
    for s in range(0, len(items), self.batch_size):
      chunk = [(c, _built(v), t) for c, v, t in items[s:s + self.batch_size]]
      elbos = self.model.elbo([c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk],
                              num_samples=self.mc_num, seed=self.seed)  # noise per request: batching changes no score
      out += [(-float(e), self._is_greedy(c) if self.check_greedy else False) for e, c in zip(elbos, chunk)]
      del chunk  # its visuals are freed before the next batch is built, not after
    return out

  def _is_greedy(self, item) -> bool:
    """Whether greedy decoding of exactly len(continuation) tokens reproduces it (as the original's
    suffix_greedy_prediction); False when the tokenizer cannot count tokens."""
    context, images, cont = item
    tok = getattr(self.model, "tokenizer", None)
    try:
      enc = tok.encode(cont, add_special_tokens=False)
    except TypeError:
      enc = tok.encode(cont)
    except AttributeError:
      return False
    n = len(getattr(enc, "ids", enc))
    if n == 0:
      return False
    out = self.model.generate([context], [images], SamplingParams(gen_length=n, seed=self.seed))[0]  # eot stops
    text = out if isinstance(out, str) else out.text
    return text.strip() == cont.strip()

  def generate_until_multi_round(self, requests) -> list[list[str]]:
    """args: (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split) -> per request
    the list of its round answers, in request order (lmms-eval 0.7.2+ passes only a list of strings
    through to the task's process_results; anything else becomes its str()).

    Signature and loop as lmms-eval v0.3.x (api/task.py construct_requests; models/llava_onevision.py,
    which the original LLaDA-V eval copies): round 0 uses the request's context and visuals; after
    round k-1, doc_to_text(doc, previous_output=answers, round_idx=k, previous_round_info=info)
    returns (visuals, context, terminal, round_res, info). The task writes the previous answers into
    the next context, so it is used as given; on `terminal` the result is round_res.
    """
    state = []  # per request: [visuals, context, answers so far, round info]
    for req in requests:
      context, _, doc_to_visual, _, doc_id, task, split = req.args[:7]
      state.append([self._visuals(doc_to_visual, doc_id, task, split), context, [], None])
    res: list[list[str] | None] = [None] * len(requests)
    live, round_idx = list(range(len(requests))), 0
    while live:
      outs = self._generate([self._prepare(state[i][1], requests[i].args[1], state[i][0]) for i in live])
      for i, out in zip(live, outs):
        state[i][2].append(out)
      round_idx += 1
      still = []
      for i in live:
        _, _, _, doc_to_text, doc_id, task, split = requests[i].args[:7]
        vis, context, terminal, round_res, info = doc_to_text(
            self.task_dict[task][split][doc_id], previous_output=list(state[i][2]), round_idx=round_idx,
            previous_round_info=state[i][3])
        answers = state[i][2] if round_res is None else list(round_res)
        if terminal:
          res[i] = list(answers)
        else:
          state[i] = [lambda vis=vis: self._model_visuals(vis), context, answers, info]
          still.append(i)
      live = still
    return res


def _built(visuals) -> list:
  return visuals() if callable(visuals) else visuals


def lmms_eval_manifest():
  """Entry point payload for lmms-eval >= 0.6's `lmms_eval.models` group (pyproject.toml registers it)."""
  from lmms_eval.models.registry_v2 import ModelManifest
  return ModelManifest(model_id="lladav_jax", simple_class_path="lladav_jax.eval.lmms_plugin.LLaDAVJax")
