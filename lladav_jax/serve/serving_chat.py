"""Chat completions and completions: messages (or a raw prompt) -> the prompt ids, the request -> engine jobs,
the jobs' events -> the response or its stream of chunks, failures -> OpenAI's error bodies.

Every request is checked and prepared (template, images decoded through the training loader, expanded and
bucketed by `inference.prompts.prepare_inputs`) before it is queued, so a bad one is a 400 naming its field
and never reaches the engine thread.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
import uuid
from typing import Optional

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lladav_jax.config import IMAGE_TOKEN_INDEX
from lladav_jax.data import template
from lladav_jax.inference.engine import EngineShapes
from lladav_jax.inference.model import InferenceModel
from lladav_jax.inference.features import TileFeatures
from lladav_jax.inference.params import SamplingParams
from lladav_jax.inference.prompts import bucket_tiles, prepare_inputs, requests, widen
from lladav_jax.inference.runner import Lane
from lladav_jax.inference.scheduler import Denoise, Done, Event, Failed, Job, Prefix, Scheduler, asyncio_emitter
from lladav_jax.inference.text import answer_ids, finished_text, stop_list, streamable, token_pieces
from lladav_jax.serve import images
from lladav_jax.serve.config import ServeConfig
from lladav_jax.serve.metrics import Metrics, compiles
from lladav_jax.serve.protocol import (MAX_STOPS, STOP_TOKENS, AssistantMessage, ChatCompletion, ChatCompletionChunk,
                                       ChatRequest, Choice, ChunkChoice, Completion, CompletionChoice, CompletionChunk,
                                       CompletionChunkChoice, CompletionRequest, Delta, FieldError, Usage, error_body,
                                       wire)

log = logging.getLogger("lladav_jax.serve")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


class ServingChat:
  """The model, its scheduler and metrics, and the chat completions on them."""

  def __init__(self, model: InferenceModel, cfg: ServeConfig):
    if model.tokenizer is None:
      raise ValueError("the model has no tokenizer (tokenizer.json next to the checkpoint); the server needs one")
    self.model, self.cfg, self.tok = model, cfg, model.tokenizer
    limit = model.cfg.llm.max_position_embeddings
    if cfg.max_model_len > limit:
      raise ValueError(f"max_model_len={cfg.max_model_len} is more than the model's {limit} positions")
    self.defaults = dataclasses.replace(SamplingParams(), cache=cfg.cache).for_model(model)
    self.lanes = [Lane(self.defaults.engine_config(max_block_length=self._max_block(g), guidance=cfg.enable_cfg,
                                                   forward_rows=cfg.row_group),
                       EngineShapes(rows=cfg.max_num_seqs, prompt_len=p, answer_len=g, stops=MAX_STOPS + 1,
                                    stop_len=STOP_TOKENS, tiles=self._lane_tiles(p)))
                  for p in cfg.prompt_lanes for g in cfg.answer_lanes]
    self.features = TileFeatures(model, cfg.mm_cache_bytes)
    self.sched = Scheduler(model, self.lanes, max_rows=cfg.max_num_seqs, max_queue=cfg.max_queue,
                           features=self.features, warm_tiles=range(1, self._lane_tiles(cfg.max_model_len) + 1),
                           on_tokens=lambda t, n: self.metrics.job_ended(t, n))
    self.metrics = Metrics(self.sched)
    self.ready = False  # loaded and warmed up
    self.draining = False  # SIGTERM: no new requests, in-flight ones finish
    self.open_streams = 0

  def _max_block(self, answer_bucket: int) -> int:
    """A lane's longest block: the whole answer, except under the dual cache, whose window it is."""
    return min(answer_bucket, self.cfg.max_block_length) if self.cfg.cache == "dual" else answer_bucket

  def _lane_tiles(self, prompt_len: int) -> int:
    """The tiles a prompt of `prompt_len` positions can hold: --max-tiles, in its tile bucket, where a tile's
    features fit (a downscaled anyres tile is smaller than a whole one: any tile count up to the limit)."""
    smallest = self.model.image_cfg.tokens_per_tile // 4  # (the merge plan's smallest tile)
    return bucket_tiles(self.cfg.max_tiles) if self.cfg.max_tiles and prompt_len >= smallest else 0

  def lane(self, plen: int, gen_length: int, block_length: int, tiles: int) -> int:
    """The lane of least work that holds the request: the smallest prompt + answer buckets that fit."""
    fits = [k for k, lane in enumerate(self.lanes) if lane.shapes.prompt_len >= plen and lane.shapes.tiles >= tiles
            and lane.shapes.answer_len >= gen_length and lane.cfg.max_block_length >= block_length]
    return min(fits, key=lambda k: (self.lanes[k].width, k))

  def check_limits(self, plen: int, tiles: int, params, where: str):
    """A request beyond the launch limits: 400 naming the limit and the flag that raises it."""
    c, g = self.cfg, params.gen_length
    if tiles > c.max_tiles:
      raise FieldError(where, f"the images need {tiles} tiles; this server takes at most {c.max_tiles} a request "
                       f"(start it with a larger --max-tiles)")
    if g > c.max_answer_tokens:
      raise FieldError("max_tokens", f"max_tokens={g} is more than this server's {c.max_answer_tokens} (start it "
                       f"with a larger --max-answer-tokens)")
    if plen + g > c.max_model_len:
      raise FieldError("max_tokens" if plen < c.max_model_len else where,
                       f"the prompt ({plen} positions, images included) and max_tokens={g} are more than this "
                       f"server's {c.max_model_len} positions (start it with a larger --max-model-len)")
    if params.block_length > self._max_block(c.max_answer_tokens):
      raise FieldError("block_length", f"block_length={params.block_length} is more than the dual cache's window "
                       f"of {c.max_block_length} (start the server with a larger --max-block-length)")

  # ------------------------------------------------------------ preparation (a worker thread)
  def prompt_ids(self, req: ChatRequest) -> tuple[list[int], list]:
    """The chat template of the messages (the default system prompt unless one is given, as
    LLaDAV.generate) with `<image>` placeholders, and the decoded images in order."""
    msgs, imgs = [], []
    for i, m in enumerate(req.messages):
      if isinstance(m.content, str):
        text, ims = m.content, []
      else:
        texts, ims = [], []
        for j, part in enumerate(m.content):
          if part.type == "text":
            texts.append(part.text)
            continue
          where = f"messages.{i}.content.{j}.image_url.url"
          if m.role != "user":
            raise FieldError(where, f"images go in user messages, not {m.role} ones")
          ims.append(images.load(part.image_url.url, where, image_root=self.cfg.image_root,
                                 max_bytes=self.cfg.max_image_bytes, max_pixels=self.cfg.max_image_pixels))
        text = "\n".join(texts)
      text = template.question_with_images(text, len(ims))  # as generate: the tags first unless written
      if text.count(template.IMAGE_TAG) != len(ims):
        raise FieldError(f"messages.{i}.content", f"{text.count(template.IMAGE_TAG)} {template.IMAGE_TAG} tags "
                         f"but {len(ims)} images")
      msgs.append((m.role, text))
      imgs += ims
    if not any(r == "system" for r, _ in msgs):
      msgs.insert(0, ("system", template.DEFAULT_SYSTEM))
    return template.render_inference(self.tok, msgs), imgs

  def completion_ids(self, req: CompletionRequest) -> list[int]:
    """A raw prompt: BOS and its tokens, no chat template (images only through /v1/chat/completions)."""
    ids = [self.tok.bos_id] + self.tok.encode(req.prompt)
    if IMAGE_TOKEN_INDEX in ids:
      raise FieldError("prompt", f"{template.IMAGE_TAG} in a completion prompt: images go through "
                       "/v1/chat/completions (image_url parts)")
    return ids

  def prepare(self, req: ChatRequest | CompletionRequest, emit_for) -> tuple[list[Job], int]:
    """The request's jobs (one a choice; choice i gets seed + i, as generate's prompt i) and its prompt
    length in tokens (image features included)."""
    if req.model != self.cfg.served_model_name:
      raise FieldError("model", f"the model {req.model!r} does not exist; this server serves "
                       f"{self.cfg.served_model_name!r}", status=404)
    if req.n > self.cfg.max_queue:
      raise FieldError("n", f"n={req.n} is more than the queue holds ({self.cfg.max_queue})")
    params = self.launch_settings(req, req.to_sampling_params())
    chat = isinstance(req, ChatRequest)
    ids, imgs = self.prompt_ids(req) if chat else (self.completion_ids(req), [])
    params = params.for_model(self.model)
    try:
      stop_ids = self.tok.encode_stop_strings(list(params.stop))
    except ValueError as e:
      raise FieldError("stop", str(e)) from None
    if any(len(s) > STOP_TOKENS for s in stop_ids):
      raise FieldError("stop", f"a stop string is longer than {STOP_TOKENS} tokens")
    stops = stop_list(params.eot_id, stop_ids)
    try:
      inputs = prepare_inputs(self.model, [ids] * req.n, [imgs] * req.n, stop_ids=stops,
                              seeds=[params.seed + i for i in range(req.n)], rows=req.n,
                              stop_shape=(MAX_STOPS + 1, STOP_TOKENS))
    except ValueError as e:
      raise FieldError("messages" if chat else "prompt", str(e)) from None
    plen = int(np.sum(inputs.prompt.valid[0]))
    used = inputs.prompt.merge_idx[0][inputs.prompt.merge_w[0] != 0] // self.features.tile_tokens
    used = used[used < inputs.prompt.pixels.shape[1]]
    tiles = int(used.max()) + 1 if used.size else 0
    self.check_limits(plen, tiles, params, "messages" if chat else "prompt")
    # One engine of lanes fixed at launch: the answer length, block length and step count are the row's values,
    # the prompt goes into its lane's bucket (left padding), the tiles' features into its tile slots.
    k = self.lane(plen, params.gen_length, params.block_length, tiles)
    shapes = self.lanes[k].shapes
    inputs = widen(self.model, inputs, shapes.prompt_len)
    row_params = params.row_params(shapes.answer_len, self.lanes[k].cfg.max_block_length)
    stop_len = max(len(s) for s in stops)
    jobs = [Job(request=r, lane=k, gen_length=params.gen_length, stop_len=stop_len, mask_id=params.mask_id,
                denoise=req.denoise, emit=emit_for(i))
            for i, r in enumerate(requests(inputs, row_params, 0))]
    return jobs, plen

  def launch_settings(self, req: ChatRequest | CompletionRequest, params):
    """The cache mode and classifier-free guidance are the server's (its flags): a request that asks for
    another gets 400 naming the flag."""
    if req.cache is not None and req.cache != self.cfg.cache:
      raise FieldError("cache", f"this server runs cache={self.cfg.cache or 'none'}; start it with --cache "
                       f"{req.cache} for cache={req.cache}")
    if params.cfg_scale > 0 and not self.cfg.enable_cfg:
      raise FieldError("cfg_scale", f"cfg_scale={params.cfg_scale} needs classifier-free guidance, which this "
                       "server runs only when started with --enable-cfg")
    return dataclasses.replace(params, cache=self.cfg.cache)

  def text(self, ids, stops=()) -> tuple[str, bool]:
    """The text of answer ids cut before the earliest of the stop strings, and whether one cut it (the rule of
    LLaDAV.generate: text.finished_text)."""
    return finished_text(self.tok, ids, self.model.cfg.mask_token_id, stops)

  def warm_up(self):
    """Waits for the engine thread to compile every program a request within the limits can need (or to read
    them from the compilation cache) before /health says ready; logs the time and the programs."""
    c0 = compiles()
    shapes = ", ".join(f"{p}+{g}" for p in self.cfg.prompt_lanes for g in self.cfg.answer_lanes)
    log.info("warming up: %d lanes (prompt+answer positions: %s), %d rows each, tiles up to %d",
             len(self.lanes), shapes, self.cfg.max_num_seqs, self.cfg.max_tiles)
    while not self.sched.ready.wait(0.5):
      if not self.sched.thread.is_alive():  # its traceback is in the log: a server that cannot serve exits 1
        log.error("warm-up failed: exiting")
        os._exit(1)
    log.info("warmed up in %.1f s (%d programs compiled, the rest read from the compilation cache): ready",
             self.sched.warm_up_s, compiles() - c0)
    self.ready = True

  # ------------------------------------------------------------ a request (the event loop)
  async def create(self, req: ChatRequest | CompletionRequest, request: Request, t0: float) -> Response:
    """The response to a validated request: JSON, a stream, or an error body."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    try:
      jobs, plen = await asyncio.to_thread(self.prepare, req, lambda i: asyncio_emitter(loop, events, i))
    except FieldError as e:
      return self.fail(e.status, e.message, e.param, "model_not_found" if e.status == 404 else None)
    except Exception as e:  # a preparation bug fails this request only
      log.exception("preparing a request failed")
      return self.fail(500, f"the request could not be prepared: {type(e).__name__}: {e}")
    if not self.sched.submit(jobs):
      return self.fail(429, f"the queue is full ({self.cfg.max_queue} answers waiting); retry later",
                       headers={"Retry-After": str(self.cfg.retry_after_s)})
    run = _Run(self, req, jobs, plen, events, t0)
    if req.stream:
      return StreamingResponse(run.sse(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await run.complete(request)

  def fail(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
           headers=None) -> JSONResponse:
    self.metrics.requests.labels(str(status)).inc()
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class _Run:
  """One accepted request: its jobs' events -> text deltas, the response, the metrics."""

  def __init__(self, srv: ServingChat, req: ChatRequest | CompletionRequest, jobs: list[Job], plen: int,
               events: asyncio.Queue, t0: float):
    self.srv, self.req, self.jobs, self.plen, self.events, self.t0 = srv, req, jobs, plen, events, t0
    self.chat = isinstance(req, ChatRequest)
    self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
    self.created = int(time.time())
    self.sent = [""] * len(jobs)  # text already given out, per choice
    self.stops = tuple(req.stops)  # they cut the text too, wherever the tokens split them (text.finished_text)
    self.results: dict[int, Done] = {}
    self.first: Optional[float] = None
    self.ended = False

  def _prefix_text(self, ids) -> str:
    """What may be sent of a final answer prefix: its text less the trailing replacement characters (a
    character split across tokens) and whitespace (the decoder may fold it into what follows), which wait for
    the next token, then before any stop string and less the characters that could start one
    (text.streamable): never a part of a stop string, and always a prefix of the finished text."""
    return streamable(self.srv.text(ids)[0].rstrip("\ufffd").rstrip(), self.stops)

  def _delta(self, i: int, text: str) -> str:
    """New text of choice i past what was sent: `text` is its finished text or `_prefix_text`'s."""
    if not text.startswith(self.sent[i]):
      log.warning("choice %d: the answer's text does not extend the streamed prefix", i)
      return ""
    new = text[len(self.sent[i]):]
    self.sent[i] = text
    if new and self.first is None:
      self.first = time.monotonic()
      self.srv.metrics.ttft.observe(self.first - self.t0)
    return new

  def _take(self, item) -> tuple[int, Event]:
    """(choice, event) from the queue: an engine failure raises; a done choice is recorded."""
    i, ev = item
    if isinstance(ev, Failed):
      raise RuntimeError(ev.message)
    if isinstance(ev, Done):
      self.results[i] = ev
    return i, ev

  async def _events(self):
    """(choice, event) until every choice is done."""
    while len(self.results) < len(self.jobs):
      yield self._take(await self.events.get())

  def _finish(self, status: int = 200):
    self.ended = True
    m = self.srv.metrics
    m.requests.labels(str(status)).inc()
    if status == 200:
      m.latency.observe(time.monotonic() - self.t0)

  def _cancel(self):
    for j in self.jobs:
      self.srv.sched.cancel(j)

  def _ids(self, i: int) -> list[int]:
    out = self.results[i].result
    return answer_ids(out.response, out.stop, self.jobs[i].gen_length)

  def _choice_end(self, i: int) -> tuple[str, str]:
    """Choice i's finished text and finish reason: "stop" when a stop sequence ended it or a stop string cut
    its text."""
    text, cut = self.srv.text(self._ids(i), self.stops)
    return text, ("stop" if cut or self.results[i].result.stop < self.jobs[i].gen_length else "length")

  def _usage(self) -> Usage:
    done = sum(len(self._ids(i)) for i in self.results)
    return Usage(prompt_tokens=self.plen, completion_tokens=done, total_tokens=self.plen + done)

  def _nfe(self) -> int:
    return sum(d.result.nfe for d in self.results.values())

  async def complete(self, request: Request):
    """The non-streamed response; a client that leaves cancels its answers."""
    try:
      while len(self.results) < len(self.jobs):
        try:  # Queue.get is safe to cancel: no event is lost on a timeout
          i, ev = self._take(await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S))
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            self._cancel()
            self._finish(499)
            return Response(status_code=499)
          continue
        if isinstance(ev, Prefix):
          self._delta(i, self._prefix_text(ev.ids))
    except RuntimeError as e:
      self._finish(500)
      return JSONResponse(error_body(500, f"the engine failed: {e}"), status_code=500)
    choices = []
    for i in range(len(self.jobs)):
      text, reason = self._choice_end(i)
      if self.first is None and text:
        self._delta(i, text)
      r = self.results[i].result
      if self.chat:
        choices.append(Choice(index=i, message=AssistantMessage(role="assistant", content=text),
                              finish_reason=reason, nfe=r.nfe, steps=r.steps))
      else:
        choices.append(CompletionChoice(index=i, text=text, finish_reason=reason, logprobs=None, nfe=r.nfe,
                                        steps=r.steps))
    self._finish()
    kind = (ChatCompletion, "chat.completion") if self.chat else (Completion, "text_completion")
    return wire(kind[0](id=self.id, object=kind[1], created=self.created, model=self.req.model, choices=choices,
                        usage=self._usage(), nfe=self._nfe()))

  def _chunk(self, choices: list, **extra) -> str:
    if self.chat:
      body = ChatCompletionChunk(id=self.id, object="chat.completion.chunk", created=self.created,
                                 model=self.req.model, choices=choices, **extra)
    else:
      body = CompletionChunk(id=self.id, object="text_completion", created=self.created, model=self.req.model,
                             choices=choices, **extra)
    return f"data: {json.dumps(wire(body))}\n\n"

  def _choice(self, i: int, text: str | None = None, role: bool = False, finish_reason=None):
    """A chunk's choice: a chat delta (its role once, at the start) or a completion's text."""
    if not self.chat:
      return CompletionChunkChoice(index=i, text=text or "", finish_reason=finish_reason)
    delta = Delta(role="assistant", content="") if role else Delta(content=text) if text else Delta()
    return ChunkChoice(index=i, delta=delta, finish_reason=finish_reason)

  def _denoise(self, ev: Denoise) -> dict:
    """The page's live view of one step: each answer position's text (None while masked)."""
    ids = ev.response.tolist()
    pieces = [None if t == self.srv.model.cfg.mask_token_id else p for t, p in zip(ids, token_pieces(self.srv.tok, ids))]
    return {"step": ev.steps, "tokens": pieces, "commit_step": ev.commit_step.tolist(), "stop": ev.stop}

  async def sse(self):
    """Server-Sent Events: a role chunk per choice, then a delta whenever more of an answer is final, a
    chunk with finish_reason (and nfe) per choice, the usage chunk if asked for, then [DONE]."""
    self.srv.open_streams += 1
    try:
      for i in range(len(self.jobs) if self.chat else 0):
        yield self._chunk([self._choice(i, role=True)])
      try:
        async for i, ev in self._events():
          if isinstance(ev, Denoise):
            yield self._chunk([self._choice(i)], denoise=self._denoise(ev))
          elif isinstance(ev, Prefix):
            new = self._delta(i, self._prefix_text(ev.ids))
            if new:
              yield self._chunk([self._choice(i, new)])
          elif isinstance(ev, Done):
            text, reason = self._choice_end(i)
            new = self._delta(i, text)
            yield self._chunk([self._choice(i, new, finish_reason=reason)], nfe=ev.result.nfe, steps=ev.result.steps)
      except RuntimeError as e:
        self._finish(500)
        yield f"data: {json.dumps(error_body(500, f'the engine failed: {e}'))}\n\n"
        return
      if self.req.stream_options and self.req.stream_options.include_usage:
        yield self._chunk([], usage=wire(self._usage()), nfe=self._nfe())
      self._finish()
      yield "data: [DONE]\n\n"
    finally:
      self.srv.open_streams -= 1
      if not self.ended:  # the client left mid-stream: its rows are freed
        self._cancel()
        self._finish(499)
