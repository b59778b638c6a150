"""The HTTP side: OpenAI-compatible routes over the `Scheduler`, Prometheus metrics, the web page.

Every request is checked and prepared (template, images decoded through the training loader, expanded
and bucketed by `generation.prepare_inputs`) before it is queued, so a bad one is a 400 naming its field
and never reaches the engine thread. Errors have OpenAI's body: {"error": {"message", "type", "param",
"code"}}.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import json
import logging
import os
import random
import threading
import time
import uuid
from typing import Optional

import numpy as np
import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lladav_jax import generation
from lladav_jax.data import template
from lladav_jax.generate import token_pieces
from lladav_jax.sampling.engine import EngineShapes
from lladav_jax.sampling.settings import row_settings
from lladav_jax.serve import images
from lladav_jax.serve.scheduler import Job, Scheduler, asyncio_emitter
from lladav_jax.serve.schema import MAX_STOPS, STOP_TOKENS, ChatRequest, FieldError

log = logging.getLogger("lladav_jax.serve")
PAGE = os.path.join(os.path.dirname(__file__), "page.html")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  served_model_name: str
  api_key: Optional[str] = None
  image_root: Optional[str] = None
  max_num_seqs: int = 8  # engine rows (running answers in all)
  max_queue: int = 64  # answers waiting for a row; beyond: 429
  max_image_bytes: int = 20 << 20
  max_body_bytes: int = 64 << 20  # a request with its data: URLs (beyond: 413)
  max_image_pixels: int = 89478485  # PIL's decompression-bomb limit, as the training data's default
  retry_after_s: int = 1


class Metrics:
  """The Prometheus series of one server (its own registry)."""

  def __init__(self, sched: Scheduler, window_s: float = 10.0):
    r = self.registry = CollectorRegistry()
    self.requests = Counter("lladav_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
    Gauge("lladav_queue_depth", "Answers waiting for an engine row", registry=r).set_function(lambda: sched.queue_depth)
    Gauge("lladav_busy_rows", "Engine rows holding an answer", registry=r).set_function(lambda: sched.busy_rows)
    self.tokens = Counter("lladav_generated_tokens", "Answer tokens generated", registry=r)
    self.nfe = Counter("lladav_forward_evaluations", "Forward evaluations (2 a step with CFG)", registry=r)
    Gauge("lladav_tokens_per_second", f"Answer tokens a second over the last {window_s:g} s",
          registry=r).set_function(lambda: self._rate(1))
    Gauge("lladav_forward_evaluations_per_second", f"Forward evaluations a second over the last {window_s:g} s",
          registry=r).set_function(lambda: self._rate(2))
    buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, float("inf"))
    self.latency = Histogram("lladav_request_latency_seconds", "Arrival to the last answer", buckets=buckets,
                             registry=r)
    self.ttft = Histogram("lladav_time_to_first_token_seconds", "Arrival to the first final answer text",
                          buckets=buckets, registry=r)
    self.window_s = window_s
    self.recent: collections.deque = collections.deque()  # (time, tokens, nfe) of recent job ends
    self.lock = threading.Lock()

  def job_ended(self, tokens: int, nfe: int):
    self.tokens.inc(tokens)
    self.nfe.inc(nfe)
    with self.lock:
      self.recent.append((time.monotonic(), tokens, nfe))

  def _rate(self, k: int) -> float:
    now = time.monotonic()
    with self.lock:
      while self.recent and self.recent[0][0] < now - self.window_s:
        self.recent.popleft()
      return sum(e[k] for e in self.recent) / self.window_s


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
  kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
          503: "service_unavailable"}.get(status, "invalid_request_error" if status < 500 else "server_error")
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_param(err: dict) -> Optional[str]:
  """The dotted field of a pydantic error; a model-level check names it as 'field: message'."""
  loc = [str(x) for x in err.get("loc", ()) if not (isinstance(x, str) and x in ("str", "list[...]"))]
  loc = [x for x in loc if not x.startswith(("function-", "tagged-union"))]
  if loc:
    return ".".join(loc)
  head = _message(err).split(":", 1)
  return head[0] if len(head) == 2 and head[0].isidentifier() else None


def _message(err: dict) -> str:
  return str(err.get("msg", "")).removeprefix("Value error, ")


class Server:
  """The model, its scheduler and metrics, and the request preparation."""

  def __init__(self, model, cfg: ServeConfig):
    if model.tokenizer is None:
      raise ValueError("the model has no tokenizer (tokenizer.json next to the checkpoint); the server needs one")
    self.model, self.cfg, self.tok = model, cfg, model.tokenizer
    self.sched = Scheduler(model, max_rows=cfg.max_num_seqs, max_queue=cfg.max_queue,
                           on_tokens=lambda t, n: self.metrics.job_ended(t, n))
    self.metrics = Metrics(self.sched)
    self.ready = False  # loaded and warmed up
    self.draining = False  # SIGTERM: no new requests, in-flight ones finish
    self.open_streams = 0

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

  def prepare(self, req: ChatRequest, emit_for) -> tuple[list[Job], int]:
    """The request's jobs (one a choice; choice i gets seed + i, as generate's prompt i) and its prompt
    length in tokens (image features included)."""
    if req.model != self.cfg.served_model_name:
      raise FieldError("model", f"the model {req.model!r} does not exist; this server serves "
                       f"{self.cfg.served_model_name!r}", status=404)
    if req.n > self.cfg.max_queue:
      raise FieldError("n", f"n={req.n} is more than the queue holds ({self.cfg.max_queue})")
    ids, imgs = self.prompt_ids(req)
    try:
      settings = generation.sampler_settings(self.model, **req.sampler_kwargs())
    except ValueError as e:
      raise FieldError(None, str(e)) from None
    try:
      stop_ids = self.tok.encode_stop_strings(req.stops)
    except ValueError as e:
      raise FieldError("stop", str(e)) from None
    if any(len(s) > STOP_TOKENS for s in stop_ids):
      raise FieldError("stop", f"a stop string is longer than {STOP_TOKENS} tokens")
    stops = generation.stop_list(settings, stop_ids)
    seed = req.seed if req.seed is not None else random.getrandbits(31)
    try:
      inputs = generation.prepare_inputs(self.model, [ids] * req.n, [imgs] * req.n, stop_ids=stops,
                                         seeds=[seed + i for i in range(req.n)], rows=req.n,
                                         stop_shape=(MAX_STOPS + 1, STOP_TOKENS))
    except ValueError as e:
      raise FieldError("messages", str(e)) from None
    plen = int(np.sum(inputs.prompt.valid[0]))
    limit = self.model.cfg.llm.max_position_embeddings
    if plen + req.gen_length > limit:
      raise FieldError("max_tokens", f"the prompt ({plen} tokens, images included) and max_tokens="
                       f"{req.gen_length} exceed the model's {limit} positions")
    g = req.gen_length
    rs = row_settings(settings, g, settings.block_length)
    shapes = EngineShapes(rows=self.cfg.max_num_seqs, prompt_len=inputs.prompt.length, answer_len=g,
                          stops=MAX_STOPS + 1, stop_len=STOP_TOKENS)
    stop_len = max(len(s) for s in stops)
    jobs = [Job(request=r, cfg=settings.engine(), shapes=shapes, gen_length=g, stop_len=stop_len,
                mask_id=settings.mask_id, denoise=req.denoise, emit=emit_for(i))
            for i, r in enumerate(generation.requests(inputs, rs, 0))]
    return jobs, plen

  def text(self, ids) -> str:
    return generation.answer_text(self.tok, ids, self.model.cfg.mask_token_id)

  def warm_up(self):
    """Compiles the default request's engine (one step) before /health says ready."""
    req = ChatRequest(model=self.cfg.served_model_name, messages=[{"role": "user", "content": "Hello"}], steps=1)
    done = threading.Event()
    jobs, _ = self.prepare(req, lambda i: lambda ev: done.set() if ev[0] in ("done", "error") else None)
    if not self.sched.submit(jobs):
      raise RuntimeError("no queue room for the warm-up request")
    done.wait()
    self.ready = True
    log.info("warmed up: ready")


def create_app(model, cfg: ServeConfig) -> FastAPI:
  srv = Server(model, cfg)
  page = open(PAGE, encoding="utf-8").read()

  async def lifespan(app):
    srv.sched.start()
    threading.Thread(target=srv.warm_up, name="lladav-warm-up", daemon=True).start()
    yield
    await asyncio.to_thread(srv.sched.stop)

  app = FastAPI(title="LLaDA-V", lifespan=lifespan, docs_url=None, redoc_url=None,
                max_body_size=max(cfg.max_body_bytes, 2 * cfg.max_image_bytes))
  app.state.server = srv

  def fail(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None, headers=None):
    srv.metrics.requests.labels(str(status)).inc()
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)

  def authorized(request: Request) -> bool:
    if not cfg.api_key:
      return True
    got = request.headers.get("authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode())

  @app.get("/health")
  async def health():
    ok = srv.ready and not srv.draining
    return Response(status_code=200 if ok else 503)

  @app.get("/metrics")
  async def metrics():
    return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

  @app.get("/", response_class=HTMLResponse)
  async def index():
    return HTMLResponse(page.replace("__MODEL__", json.dumps(cfg.served_model_name).replace("</", "<\\/")))

  @app.get("/v1/models")
  async def models(request: Request):
    if not authorized(request):
      return fail(401, "incorrect or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
    return {"object": "list", "data": [{"id": cfg.served_model_name, "object": "model", "created": 0,
                                        "owned_by": "lladav-jax"}]}

  @app.post("/v1/chat/completions")
  async def chat(request: Request):
    if not authorized(request):
      return fail(401, "incorrect or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
    if srv.draining or not srv.ready:
      return fail(503, "the server is shutting down" if srv.draining else "the server is warming up",
                  headers={"Retry-After": str(cfg.retry_after_s)})
    t0 = time.monotonic()
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return fail(400, f"the body is not valid JSON: {e}")
    try:
      req = ChatRequest.model_validate(body)
    except pydantic.ValidationError as e:
      err = e.errors()[0]
      param = _validation_param(err)
      msg = _message(err)
      msg = msg if msg.startswith(f"{param}:") else f"{param or 'body'}: {msg}"
      return fail(400, msg + (f" (and {e.error_count() - 1} more errors)" if e.error_count() > 1 else ""), param)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    try:
      jobs, plen = await asyncio.to_thread(srv.prepare, req, lambda i: asyncio_emitter(loop, events, i))
    except FieldError as e:
      return fail(e.status, e.message, e.param, "model_not_found" if e.status == 404 else None)
    except Exception as e:  # a preparation bug fails this request only
      log.exception("preparing a request failed")
      return fail(500, f"the request could not be prepared: {type(e).__name__}: {e}")
    if not srv.sched.submit(jobs):
      return fail(429, f"the queue is full ({cfg.max_queue} answers waiting); retry later",
                  headers={"Retry-After": str(cfg.retry_after_s)})
    run = _Run(srv, req, jobs, plen, events, t0)
    if req.stream:
      return StreamingResponse(run.sse(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await run.complete(request)

  return app


class _Run:
  """One accepted request: its jobs' events -> text deltas, the response, the metrics."""

  def __init__(self, srv: Server, req: ChatRequest, jobs: list[Job], plen: int, events: asyncio.Queue, t0: float):
    self.srv, self.req, self.jobs, self.plen, self.events, self.t0 = srv, req, jobs, plen, events, t0
    self.id = f"chatcmpl-{uuid.uuid4().hex}"
    self.created = int(time.time())
    self.sent = [""] * len(jobs)  # text already given out, per choice
    self.results: dict[int, dict] = {}
    self.first: Optional[float] = None
    self.ended = False

  def _delta(self, i: int, ids, final: bool) -> str:
    """New text of choice i: its final prefix (or whole answer) past what was sent. A prefix's trailing
    replacement characters (a character split across tokens) and whitespace (the decoder may fold it into
    what follows) wait for the next token."""
    text = self.srv.text(ids)
    if not final:
      text = text.rstrip("\ufffd").rstrip()
    if not text.startswith(self.sent[i]):
      log.warning("choice %d: the answer's text does not extend the streamed prefix", i)
      return ""
    new = text[len(self.sent[i]):]
    self.sent[i] = text
    if new and self.first is None:
      self.first = time.monotonic()
      self.srv.metrics.ttft.observe(self.first - self.t0)
    return new

  def _take(self, item):
    """(choice, event) from the queue: an engine error raises; a done choice is recorded."""
    i, ev = item
    if ev[0] == "error":
      raise RuntimeError(ev[1])
    if ev[0] == "done":
      self.results[i] = ev[1]
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

  def _choice_end(self, i: int):
    out = self.results[i]
    g = self.req.gen_length
    ids = generation.answer_ids(out, g)
    return ids, ("stop" if int(out["stop"]) < g else "length")

  def _usage(self) -> dict:
    done = sum(len(self._choice_end(i)[0]) for i in self.results)
    return {"prompt_tokens": self.plen, "completion_tokens": done, "total_tokens": self.plen + done}

  def _nfe(self) -> int:
    return sum(int(r["nfe"]) for r in self.results.values())

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
        if ev[0] == "prefix":
          self._delta(i, ev[1], False)
    except RuntimeError as e:
      self._finish(500)
      return JSONResponse(error_body(500, f"the engine failed: {e}"), status_code=500)
    choices = []
    for i in range(len(self.jobs)):
      ids, reason = self._choice_end(i)
      text = self.srv.text(ids)
      if self.first is None and text:
        self._delta(i, ids, True)
      choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "nfe": int(self.results[i]["nfe"]), "steps": int(self.results[i]["steps"])})
    self._finish()
    return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.req.model,
            "choices": choices, "usage": self._usage(), "nfe": self._nfe()}

  def _chunk(self, choices: list, **extra) -> str:
    body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.req.model,
            "choices": choices, **extra}
    return f"data: {json.dumps(body)}\n\n"

  async def sse(self):
    """Server-Sent Events: a role chunk per choice, then a delta whenever more of an answer is final, a
    chunk with finish_reason (and nfe) per choice, the usage chunk if asked for, then [DONE]."""
    self.srv.open_streams += 1
    try:
      for i in range(len(self.jobs)):
        yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
      try:
        async for i, ev in self._events():
          if ev[0] == "denoise":
            gen, cs, step, stop = ev[1:]
            pieces = [None if t == self.srv.model.cfg.mask_token_id else p
                      for t, p in zip(gen.tolist(), token_pieces(self.srv.tok, gen.tolist()))]
            yield self._chunk([{"index": i, "delta": {}, "finish_reason": None}],
                              denoise={"step": step, "tokens": pieces, "commit_step": cs.tolist(), "stop": stop})
            continue
          if ev[0] == "prefix":
            new = self._delta(i, ev[1], False)
            if new:
              yield self._chunk([{"index": i, "delta": {"content": new}, "finish_reason": None}])
            continue
          ids, reason = self._choice_end(i)
          new = self._delta(i, ids, True)
          yield self._chunk([{"index": i, "delta": {"content": new} if new else {}, "finish_reason": reason}],
                            nfe=int(ev[1]["nfe"]), steps=int(ev[1]["steps"]))
      except RuntimeError as e:
        self._finish(500)
        yield f"data: {json.dumps(error_body(500, f'the engine failed: {e}'))}\n\n"
        return
      if self.req.stream_options and self.req.stream_options.include_usage:
        yield self._chunk([], usage=self._usage(), nfe=self._nfe())
      self._finish()
      yield "data: [DONE]\n\n"
    finally:
      self.srv.open_streams -= 1
      if not self.ended:  # the client left mid-stream: its rows are freed
        self._cancel()
        self._finish(499)
