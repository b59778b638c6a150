"""The HTTP routes: `/v1/chat/completions` and `/v1/completions` (JSON or SSE stream), `/v1/models`, `/health`,
`/metrics` and the chat page `/`, over one `ServingChat`."""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lladav_jax.inference.model import InferenceModel
from lladav_jax.serve.config import ServeConfig
from lladav_jax.serve.protocol import ChatRequest, CompletionRequest, validation_error
from lladav_jax.serve.serving_chat import ServingChat

PAGE = os.path.join(os.path.dirname(__file__), "page.html")


def create_app(model: InferenceModel, cfg: ServeConfig) -> FastAPI:
  srv = ServingChat(model, cfg)
  page = open(PAGE, encoding="utf-8").read()

  async def lifespan(app):
    srv.sched.start()
    threading.Thread(target=srv.warm_up, name="lladav-warm-up", daemon=True).start()
    yield
    await asyncio.to_thread(srv.sched.stop)

  app = FastAPI(title="LLaDA-V", lifespan=lifespan, docs_url=None, redoc_url=None,
                max_body_size=max(cfg.max_body_bytes, 2 * cfg.max_image_bytes))
  app.state.server = srv

  def authorized(request: Request) -> bool:
    if not cfg.api_key:
      return True
    got = request.headers.get("authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode())

  def unauthorized():
    return srv.fail(401, "incorrect or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

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
      return unauthorized()
    return {"object": "list", "data": [{"id": cfg.served_model_name, "object": "model", "created": 0,
                                        "owned_by": "lladav-jax"}]}

  @app.post("/v1/chat/completions")
  async def chat(request: Request):
    return await respond(request, ChatRequest)

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await respond(request, CompletionRequest)

  async def respond(request: Request, kind):
    if not authorized(request):
      return unauthorized()
    if srv.draining or not srv.ready:
      return srv.fail(503, "the server is shutting down" if srv.draining else "the server is warming up",
                      headers={"Retry-After": str(cfg.retry_after_s)})
    t0 = time.monotonic()
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return srv.fail(400, f"the body is not valid JSON: {e}")
    try:
      req = kind.model_validate(body)
    except pydantic.ValidationError as e:
      return srv.fail(400, *validation_error(e))
    return await srv.create(req, request, t0)

  return app
