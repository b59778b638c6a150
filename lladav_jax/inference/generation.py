"""Offline generation: prompts (text, or token ids with image placeholders) -> the engine -> results.

The engine's rows default to the next power of two of the prompt count, its answer bucket to the
request's `gen_length`; every setting of a request is a value (no compile). Requests wait for a free row
and go in as soon as one finishes (continuous batching). Prompt i of a call gets the seed
`params.seed + i`, so its answer does not depend on how the prompts are batched.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from lladav_jax.data import template
from lladav_jax.inference.engine import EngineShapes
from lladav_jax.inference.model import InferenceModel
from lladav_jax.inference.params import SamplingParams
from lladav_jax.inference.prompts import bucket_pow2, check_images, check_texts, prepare_inputs, requests
from lladav_jax.inference.runner import run_engine
from lladav_jax.inference.text import answer_ids, finished_text, stop_list


@dataclasses.dataclass
class Trajectory:
  """The whole answer region of one sample and when each position was committed."""
  tokens: list  # G answer-position ids (mask_id where never committed)
  commit_step: list  # the step (0-based) that committed each position, -1 if never
  stop: int  # answer position where the stop sequence starts (G if none)
  mask_id: int


@dataclasses.dataclass
class GenerationResult:
  text: str  # decoded token_ids, cut at a stop string (text.finished_text; "" without a tokenizer)
  token_ids: list  # the answer before the stop, then the suffix
  nfe: int  # forward evaluations (2 per step with CFG)
  steps: int  # denoising steps
  query_tokens: int = 0  # positions run through the transformer, summed over forwards
  trajectory: Optional[Trajectory] = None
  finish_reason: str = "length"  # "stop": a stop sequence ended the answer (or a stop string cut its text)


def generate_ids(model: InferenceModel, prompt_ids: Sequence[Sequence[int]], images: Optional[Sequence[Sequence]] = None,
                 *, params: SamplingParams, stop_ids: Sequence[Sequence[int]] = (), suffix_ids: Sequence[int] = (),
                 batch_size: Optional[int] = None, length_multiple: int = 64, tiles: Optional[int] = None,
                 answer_bucket: Optional[int] = None, vocab_chunk: Optional[int] = None,
                 return_trajectory: bool = False) -> list[GenerationResult]:
  """Token-level generation: prompt ids (IMAGE_TOKEN_INDEX where images go) -> results (no text). `params`
  as given (its token ids set: `SamplingParams.for_model`); its text-level `stop` and `suffix` are not read
  here: `stop_ids` and `suffix_ids` are the token-level ones. `length_multiple` and `tiles` set the prompt
  buckets (see prepare_inputs), `answer_bucket` the answer positions compiled for (default gen_length; any
  gen_length up to it runs without a new compile), `batch_size` the engine's rows (default: the next power
  of two of the prompt count). The stops: `stop_list(params.eot_id, stop_ids)`."""
  prompt_ids = [list(p) for p in prompt_ids]
  images = check_images(images, len(prompt_ids))
  if not prompt_ids:
    return []
  n = len(prompt_ids)
  stop_ids = stop_list(params.eot_id, stop_ids)
  bucket = answer_bucket or params.gen_length
  row_params = params.row_params(bucket, params.block_length)
  inputs = prepare_inputs(model, prompt_ids, images, suffix_ids=suffix_ids, stop_ids=stop_ids,
                          seeds=[params.seed + i for i in range(n)], rows=n, length_multiple=length_multiple,
                          tiles=tiles)
  shapes = EngineShapes(rows=batch_size or bucket_pow2(n), prompt_len=inputs.prompt.length, answer_len=bucket,
                        suffix_len=len(suffix_ids), stops=inputs.stop_ids.shape[1], stop_len=inputs.stop_ids.shape[2],
                        tiles=inputs.prompt.pixels.shape[1])
  rows = run_engine(model, requests(inputs, row_params, len(suffix_ids)), params.engine_config(vocab_chunk), shapes)
  g = params.gen_length
  out = []
  for r in rows:
    traj = (Trajectory(r.response[:g].tolist(), r.commit_step[:g].tolist(), min(r.stop, g), params.mask_id)
            if return_trajectory else None)
    out.append(GenerationResult(text="", token_ids=answer_ids(r.response, r.stop, g, suffix_ids), nfe=r.nfe,
                                steps=r.steps, query_tokens=r.query_tokens, trajectory=traj,
                                finish_reason="stop" if r.stop < g else "length"))
  return out


def generate(model: InferenceModel, prompts: Sequence[str], images: Optional[Sequence[Sequence]] = None,
             params: Optional[SamplingParams] = None, *, batch_size: Optional[int] = None,
             return_trajectory: bool = False, system: Optional[str] = "default", length_multiple: int = 64,
             tiles: Optional[int] = None) -> list[GenerationResult]:
  """Answers to user questions about images (one list of PIL images per prompt).

  The chat template (system prompt, `<image>` tags, assistant header) is applied as the original's
  demo/eval do; `params.stop` strings are tokenised and stop, then `<|eot_id|>` (always; see stop_list), and
  the text is cut at the earliest stop string (`params.text_stops`: none under stop_rule="original");
  `params.suffix` is a fixed text after the answer positions (never overwritten, appended to the output).
  `system`: "default" (the template's), None (no system turn) or the text.
  """
  tok = model.tokenizer
  if tok is None:
    raise ValueError("the model has no tokenizer (tokenizer.json next to the checkpoint); use generate_ids")
  if params is not None and not isinstance(params, SamplingParams):
    raise TypeError(f"params: a SamplingParams, not {type(params).__name__} (SamplingParams(**settings))")
  params = (params or SamplingParams()).for_model(model)
  prompts = check_texts(prompts)
  images = check_images(images, len(prompts))
  sys_msg = template.DEFAULT_SYSTEM if system == "default" else system
  prompt_ids = [template.inference_prompt_ids(tok, q, len(ims), system=sys_msg) for q, ims in zip(prompts, images)]
  stop_ids = tok.encode_stop_strings(list(params.stop))
  suffix_ids = tok.encode(params.suffix) if params.suffix else []
  outs = generate_ids(model, prompt_ids, images, params=params, stop_ids=stop_ids, suffix_ids=suffix_ids,
                      batch_size=batch_size, return_trajectory=return_trajectory, length_multiple=length_multiple,
                      tiles=tiles)
  for o in outs:
    o.text, cut = finished_text(tok, o.token_ids, params.mask_id, params.text_stops, len(suffix_ids),
                                params.skip_special_tokens)
    if cut:
      o.finish_reason = "stop"
  return outs
