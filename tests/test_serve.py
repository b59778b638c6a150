"""The OpenAI-compatible server (`python -m lladav_jax.serve`) in a subprocess on a tiny model, driven with the
real `openai` client and httpx: concurrent answers equal `LLaDAV.generate` alone, streams equal the
non-streamed text, every bad input gets its status (and the server keeps serving), a full queue answers 429,
a client that leaves frees its row, the API key is enforced, SIGTERM drains and exits 0 (last: it ends the
module's one server)."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import dataclasses
import io
import json
import re
import signal
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from lladav_jax.data import template
from lladav_jax.inference import SamplingParams, generation, text

from tests.serving import ServerProcess, write_tiny_model

KEY = "test-key-123"
NAME = "tiny-lladav"
MAX_IMAGE_BYTES = 200_000
# short answers: 2 blocks of 8 positions
SHORT = dict(max_tokens=16, block_length=8, steps=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  model_dir, model = write_tiny_model(str(root))
  images = root / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (56, 72, 3), np.uint8)).save(images / "a.png")
  (root / "secret.png").write_bytes((images / "a.png").read_bytes())  # outside the image root
  server = ServerProcess(model_dir, "--max-num-seqs", "2", "--max-queue", "4", "--image-root", str(images),
                         "--max-image-bytes", str(MAX_IMAGE_BYTES), env={"LLADAV_API_KEY": KEY},
                         log_path=str(root / "server.log"))
  yield dict(server=server, model=model, model_dir=model_dir, images=images, root=root)
  server.stop()


@pytest.fixture(scope="module")
def client(setup):
  return openai.OpenAI(base_url=setup["server"].url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def user(text: str, *urls: str) -> list[dict]:
  parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
  return [{"role": "user", "content": parts if urls else text}]


def chat(client, messages, **kw):
  extra = {k: kw.pop(k) for k in ("steps", "block_length", "cfg_scale", "threshold", "factor", "remasking", "cache")
           if k in kw}
  return client.chat.completions.create(model=NAME, messages=messages, extra_body=extra, **kw)


def metric(url: str, name: str, labels: str = "") -> float:
  text = httpx.get(url + "/metrics").text
  m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
  return float(m.group(1)) if m else 0.0


def test_models_health_and_the_api_key(setup, client):
  url = setup["server"].url
  assert httpx.get(url + "/health").status_code == 200
  assert [m.id for m in client.models.list().data] == [NAME]
  for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
    r = httpx.post(url + "/v1/chat/completions", headers=headers,
                   json={"model": NAME, "messages": user("hi"), **SHORT})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    assert httpx.get(url + "/v1/models", headers=headers).status_code == 401
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def encoded(img: Image.Image, fmt: str) -> tuple[Image.Image, str]:
  """The image as the server decodes it from its data: URL, and the URL."""
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return Image.open(io.BytesIO(buf.getvalue())), f"data:image/{fmt.lower()};base64," + base64.b64encode(
      buf.getvalue()).decode()


def test_concurrent_answers_at_temperature_0_equal_generate_alone(setup, client):
  model, images = setup["model"], setup["images"]
  a = Image.open(images / "a.png")
  webp, webp_url = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 90, 3), np.uint8)), "WEBP")
  jpeg, jpeg_url = encoded(Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 90, 3), np.uint8)), "JPEG")
  params = SamplingParams(gen_length=16, block_length=8, steps=16)
  plain = model.generate(["How many shapes are there?"], params=params)[0]
  stop = token_stop(model.tokenizer, plain.token_ids)  # a later token of that answer ends it early
  cases = [  # (question, images, their URLs, extra settings); two prompt buckets: text, two images
      ("What color is the circle?", [], [], {}),
      ("How many shapes are there?", [], [], dict(stop=[stop])),
      ("What shape is it?", [webp, a], [webp_url, "a.png"], {}),  # a path under --image-root
      ("Is it red?", [jpeg, a], [jpeg_url, "file://" + str(images / "a.png")], {}),
  ]
  with cf.ThreadPoolExecutor(len(cases)) as ex:  # the server works while this process runs generate
    futs = [ex.submit(chat, client, user(q, *urls), temperature=0, **SHORT, **extra) for q, _, urls, extra in cases]
    want = {q: model.generate([q], [ims], dataclasses.replace(params, **extra))[0] for q, ims, _, extra in cases}
    got = [f.result() for f in futs]
  for (q, _, _, extra), resp in zip(cases, got):
    c, w = resp.choices[0], want[q]
    if extra:  # the stop ends generate's answer before it
      assert c.finish_reason == w.finish_reason == "stop" and c.message.content == w.text, (c, w.text)
      assert w.text and stop not in w.text
      continue
    assert c.message.content == w.text and c.message.content, q
    assert resp.model_extra["nfe"] == w.nfe and c.finish_reason == "length"
    assert resp.usage.completion_tokens == len(w.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
  assert got[2].usage.prompt_tokens > 2 * 729 > got[0].usage.prompt_tokens  # image features are prompt tokens
  # a system message of its own replaces the default one
  own = chat(client, [{"role": "system", "content": "Answer in one word."}] + user("What color is the circle?"),
             temperature=0, **SHORT)
  mine = model.generate(["What color is the circle?"], params=params, system="Answer in one word.")[0]
  assert own.choices[0].message.content == mine.text
  assert own.usage.prompt_tokens < got[0].usage.prompt_tokens  # the default system prompt is longer
  # n choices at a temperature: choice i is generate's prompt i (seed + i)
  resp = chat(client, user("Where is the square?"), temperature=0.9, seed=7, n=2, **SHORT)
  want = model.generate(["Where is the square?"] * 2, params=dataclasses.replace(params, temperature=0.9, seed=7))
  assert [c.message.content for c in resp.choices] == [w.text for w in want]
  assert want[0].text != want[1].text


def _contains(ids, seq) -> bool:
  return any(list(ids[k:k + len(seq)]) == list(seq) for k in range(len(ids) - len(seq) + 1))


def token_stop(tok, ids) -> str:
  """A stop string the engine finds by its tokens: the text of a later answer token, unlike the first."""
  pieces = [tok.decode([i], skip_special=True) for i in ids]
  first = next(p for p in pieces if p.strip())
  return next(p for i, p in zip(ids, pieces) if p.strip() and p != first and tok.encode(p) == [i])


def text_only_stop(tok, ids, text: str) -> str:
  """A stop string in `text`, after some of it, whose tokens are nowhere in `ids`: only the text rule finds it
  (the demo tokenizer is word-level: "circle" and " circle" are two tokens, "TT" none: <|unk|>)."""
  pieces = [tok.decode([i], skip_special=True) for i in ids]
  for a in range(len(pieces)):
    for b in range(a + 1, min(a + 3, len(pieces)) + 1):
      s = "".join(pieces[a:b])
      for c in (s.strip(), s[1:], s):
        at = text.find(c) if c.strip() else -1
        if at > 0 and text[:at].strip() and not _contains(ids, tok.encode(c)):
          return c
  raise AssertionError(f"no stop string in {text!r} that only the text rule finds")


def test_stop_strings_cut_the_text_whatever_the_tokens_streamed_or_not(setup, client):
  """OpenAI's stops: a stop string whose tokens are not the answer's (only the text rule finds it) cuts the
  text where it first occurs, as generate's, finish_reason "stop"; a stream's deltas add up to that text (never
  a part of the stop string); with a stop the engine finds by its tokens as well, the earlier one cuts; the
  completions endpoint the same; the original's stop rule (generate only) leaves the text uncut."""
  model, tok = setup["model"], setup["model"].tokenizer
  q = "What shape is the red object?"
  params = SamplingParams(gen_length=16, block_length=8, steps=16)
  plain = model.generate([q], params=params)[0]
  stop = text_only_stop(tok, plain.token_ids, plain.text)
  want = model.generate([q], params=dataclasses.replace(params, stop=(stop,)))[0]
  assert want.token_ids == plain.token_ids and want.finish_reason == "stop"  # the engine found nothing
  assert want.text == plain.text[:plain.text.index(stop)] and want.text.strip(), (stop, plain.text)
  got = chat(client, user(q), temperature=0, stop=[stop], **SHORT)
  assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == "stop"
  chunks = list(chat(client, user(q), temperature=0, stop=stop, stream=True, **SHORT))
  deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
  assert "".join(deltas) == want.text and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
  both = [stop, token_stop(tok, plain.token_ids)]
  want2 = model.generate([q], params=dataclasses.replace(params, stop=tuple(both)))[0]
  assert want2.finish_reason == "stop" and not any(s in want2.text for s in both)
  got2 = chat(client, user(q), temperature=0, stop=both, **SHORT).choices[0]
  assert (got2.message.content, got2.finish_reason) == (want2.text, "stop")
  orig = model.generate([q], params=dataclasses.replace(params, stop=(stop,), stop_rule="original"))[0]
  assert orig.text == plain.text and orig.finish_reason == plain.finish_reason
  # /v1/completions: a raw prompt's answer, cut as well, streamed or not
  prompt = "The red circle is next to the"
  p = params.for_model(model)
  (ids,) = generation.generate_ids(model, [[tok.bos_id] + tok.encode(prompt)], params=p)
  raw = text.answer_text(tok, ids.token_ids, p.mask_id)
  cstop = text_only_stop(tok, ids.token_ids, raw)
  kw = dict(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[cstop],
            extra_body={"block_length": 8, "steps": 16})
  c = client.completions.create(**kw).choices[0]
  assert (c.text, c.finish_reason) == (raw[:raw.index(cstop)], "stop")
  streamed = [ch.choices[0] for ch in client.completions.create(**kw, stream=True) if ch.choices]
  assert "".join(ch.text for ch in streamed) == c.text and streamed[-1].finish_reason == "stop"


def test_fields_this_server_does_not_implement_get_400_naming_them(setup, client):
  """OpenAI's fields with nothing behind them here: 400 saying so and naming the field (the real client and raw
  bodies); harmless ones (user, metadata, store, parallel_tool_calls, logprobs false, n) are accepted."""
  refused = [
      (lambda: chat(client, user("hi"), logprobs=True, top_logprobs=2, **SHORT),
       "logprobs: not supported by this server (only false)"),
      (lambda: chat(client, user("hi"), tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                    **SHORT), "tools: not supported by this server (no tool calls)"),
      (lambda: chat(client, user("hi"), response_format={"type": "json_object"}, **SHORT),
       'response_format: not supported by this server (only {"type": "text"})'),
      (lambda: chat(client, user("hi"), presence_penalty=0.5, **SHORT),
       "presence_penalty: not supported by this server (only 0)"),
      (lambda: client.completions.create(model=NAME, prompt="The red", max_tokens=16, echo=True),
       "echo: not supported by this server (only false)"),
      (lambda: client.completions.create(model=NAME, prompt="The red", max_tokens=16, best_of=2),
       "best_of: not supported by this server (only best_of equal to n)"),
  ]
  for call, message in refused:
    with pytest.raises(openai.BadRequestError) as e:
      call()
    assert (e.value.body["message"], e.value.body["param"]) == (message, message.split(":")[0])
  url, auth = setup["server"].url, {"Authorization": f"Bearer {KEY}"}
  for route, body, param in (("chat/completions", {"messages": user("hi"), "logit_bias": {"5": 10}}, "logit_bias"),
                             ("chat/completions", {"messages": user("hi"), "top_p": 0.5}, "top_p"),
                             ("completions", {"prompt": "The red", "logprobs": 1}, "logprobs")):
    r = httpx.post(f"{url}/v1/{route}", json={"model": NAME, **SHORT, **body}, headers=auth, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["message"].startswith(f"{param}: not supported by this server"), r.text
  ok = chat(client, user("hi"), user="u-1", metadata={"k": "v"}, store=False, parallel_tool_calls=True,
            logprobs=False, n=2, temperature=0, **SHORT)
  assert len(ok.choices) == 2 and ok.choices[0].message.content == ok.choices[1].message.content


def _stream(url: str, body: dict) -> tuple[list[dict], list[str]]:
  """The chunks of a streamed request and its raw `data:` lines."""
  lines = []
  with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                    headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
  return [json.loads(ln[6:]) for ln in lines if ln != "data: [DONE]"], lines


def test_a_multi_turn_chat_with_its_image_resent_answers_as_generate_on_the_whole_conversation(setup, client):
  """A chat's second turn re-sends the first turn's image and carries the assistant's answer: the server's
  text equals token-level generation on the same rendered conversation (template, one image placeholder),
  and the image's tiles come from the encoder cache (hits, no new misses)."""
  model, images, url = setup["model"], setup["images"], setup["server"].url
  a = Image.open(images / "a.png")
  first = chat(client, user("What shape is it?", "a.png"), temperature=0, **SHORT).choices[0].message.content
  hits, misses = metric(url, "lladav_mm_cache_hits"), metric(url, "lladav_mm_cache_misses")
  messages = user("What shape is it?", "a.png") + [{"role": "assistant", "content": first},
                                                    {"role": "user", "content": "And its colour?"}]
  got = chat(client, messages, temperature=0, **SHORT).choices[0].message.content
  assert metric(url, "lladav_mm_cache_hits") > hits and metric(url, "lladav_mm_cache_misses") == misses
  tok = model.tokenizer
  ids = template.render_inference(tok, [("system", template.DEFAULT_SYSTEM),
                                        ("user", template.question_with_images("What shape is it?", 1)),
                                        ("assistant", first), ("user", "And its colour?")])
  params = SamplingParams(gen_length=16, block_length=8, steps=16).for_model(model)
  (want,) = generation.generate_ids(model, [ids], [[a]], params=params)
  assert got == text.answer_text(tok, want.token_ids, params.mask_id) and got


def test_completions_continue_a_raw_prompt_as_generate_ids(setup, client):
  """/v1/completions with the real client: BOS + the prompt's tokens, no chat template; the text equals
  token-level generation on the same ids, streamed or not; an image tag in the prompt is a 400 naming it."""
  model, tok = setup["model"], setup["model"].tokenizer
  prompt = "The red circle is next to the"
  got = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0,
                                  extra_body={"block_length": 8, "steps": 16})
  params = SamplingParams(gen_length=16, block_length=8, steps=16).for_model(model)
  (want,) = generation.generate_ids(model, [[tok.bos_id] + tok.encode(prompt)], params=params)
  c = got.choices[0]
  assert got.object == "text_completion" and c.text == text.answer_text(tok, want.token_ids, params.mask_id)
  assert c.finish_reason in ("stop", "length") and got.usage.completion_tokens == len(want.token_ids)
  stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                     extra_body={"block_length": 8, "steps": 16})
  chunks = list(stream)
  assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
  assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model=NAME, prompt="<image> what is it?", max_tokens=16)
  assert e.value.body["param"] == "prompt"


def test_streamed_text_equals_non_streamed(setup, client):
  q = user("What shape is the red object?")
  kw = SHORT
  whole = chat(client, q, temperature=0, **kw).choices[0].message.content
  stream = chat(client, q, temperature=0, stream=True, stream_options={"include_usage": True}, **kw)
  chunks = list(stream)
  deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
  assert "".join(deltas) == whole and len(deltas) >= 2  # more than the whole answer at the end
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
  assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].model_extra["nfe"] > 0
  # the raw stream: SSE lines ending with [DONE]; the page's denoising frames fill masks step by step
  parsed, lines = _stream(setup["server"].url, {"model": NAME, "messages": q, "temperature": 0, "denoise": True, **kw})
  assert lines[-1] == "data: [DONE]"
  frames = [c["denoise"] for c in parsed if "denoise" in c]
  assert len(frames) == parsed[-1]["steps"]  # one a step
  masks = [sum(t is None for t in f["tokens"]) for f in frames]
  assert masks == sorted(masks, reverse=True) and masks[0] > masks[-1]
  assert "".join(c["choices"][0]["delta"].get("content", "") for c in parsed if c["choices"]) == whole


def _bomb() -> str:
  """A PNG a few kilobytes long of 12000 x 8000 pixels (over PIL's decompression-bomb limit)."""
  buf = io.BytesIO()
  Image.new("1", (12000, 8000)).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(setup, client):
  url, root = setup["server"].url, setup["root"]
  auth = {"Authorization": f"Bearer {KEY}"}
  noise = Image.fromarray(np.random.default_rng(2).integers(0, 255, (400, 400, 3), np.uint8))
  good = {"model": NAME, "messages": user("hi"), **SHORT}
  img = lambda u: {**good, "messages": user("look", u)}  # noqa: E731
  where = "messages.0.content.1.image_url.url"
  cases = [  # (body, status, the field the error names)
      (b"{not json", 400, None),
      ({"model": NAME, **SHORT}, 400, "messages"),
      ({**good, "max_tokens": "many"}, 400, "max_tokens"),
      ({**good, "temperature": -0.5}, 400, "temperature"),
      ({**good, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
      ({**good, "block_length": 5}, 400, "block_length"),
      ({**good, "stepz": 4}, 400, "stepz"),
      ({**good, "model": "gpt-4"}, 404, "model"),
      (img("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()), 400, where),
      (img("data:image/png;base64,@@@"), 400, where),
      (img(encoded(noise, "PNG")[1]), 400, where),  # over --max-image-bytes
      (img(_bomb()), 400, where),
      (img("data:image/gif;base64,R0lGODlhAQABAAAAACw="), 400, where),
      (img("file://" + str(root / "secret.png")), 400, where),
      (img("../secret.png"), 400, where),
      (img("/etc/passwd"), 400, where),
      (img("https://example.com/cat.png"), 400, where),
      (img("http://127.0.0.1:1/cat.png"), 400, where),
      ({**good, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
      ({**good, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
      ({**good, "cfg_scale": 1.5}, 400, "cfg_scale"),  # started without --enable-cfg
      ({**good, "cache": "prefix"}, 400, "cache"),  # started without --cache prefix
  ]
  for body, status, param in cases:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + "/v1/chat/completions", headers={**auth, "Content-Type": "application/json"}, timeout=60, **kw)
    assert r.status_code == status, (body if isinstance(body, bytes) else str(body)[:200], r.text)
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"], (str(body)[:200], err)
  assert httpx.get(url + "/health").status_code == 200
  assert chat(client, user("still there?"), **SHORT).choices[0].message.content
  assert metric(url, "lladav_requests_total", '{status="400"}') >= len(cases) - 1


def test_a_full_queue_answers_429_with_retry_after(setup):
  url = setup["server"].url
  body = {"model": NAME, "messages": user("Tell me about the shapes.")}  # the defaults: 128 steps
  with cf.ThreadPoolExecutor(9) as ex:  # 2 rows + 4 waiting: at least three of nine are refused
    rs = list(ex.map(lambda _: httpx.post(url + "/v1/chat/completions", json=body, timeout=120,
                                          headers={"Authorization": f"Bearer {KEY}"}), range(9)))
  codes = sorted(r.status_code for r in rs)
  assert codes.count(429) >= 3 and set(codes) == {200, 429}, codes
  refused = next(r for r in rs if r.status_code == 429)
  assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["type"] == "rate_limit_error"
  done = [r.json()["choices"][0]["message"]["content"] for r in rs if r.status_code == 200]
  assert len(set(done)) == 1  # the same request, whatever its neighbours


def test_a_client_that_leaves_frees_its_row(setup, client):
  url = setup["server"].url
  nfe0, left0 = metric(url, "lladav_forward_evaluations_total"), metric(url, "lladav_requests_total", '{status="499"}')
  body = {"model": NAME, "messages": user("Describe everything."), "stream": True, "denoise": True}  # 128 steps
  with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                    timeout=60) as r:
    for line in r.iter_lines():
      if '"denoise"' in line:  # running in its row: leave
        break
  deadline = time.monotonic() + 30
  while metric(url, "lladav_requests_total", '{status="499"}') < left0 + 1 or metric(url, "lladav_busy_rows") > 0:
    assert time.monotonic() < deadline, "the row was not freed"
    time.sleep(0.1)
  assert metric(url, "lladav_forward_evaluations_total") - nfe0 < 128  # stopped before its 128 steps
  assert chat(client, user("next"), **SHORT).choices[0].message.content


def test_no_request_within_the_limits_compiles_and_each_answers_as_generate(setup, client):
  """Warm-up compiled every program: requests of other answer lengths, block lengths, step counts, prompt
  lengths and image counts (both lanes of each bucket, sent together so that they share the engine's steps)
  compile nothing, and each text equals generate's alone."""
  url, model, images = setup["server"].url, setup["model"], setup["images"]
  a = Image.open(images / "a.png")
  q, long_q = "Which shape is largest?", " ".join(["Look at the picture carefully and count the shapes."] * 12)
  programs = lambda: (metric(url, "lladav_compiles"), metric(url, "lladav_compile_cache_hits"))  # noqa: E731
  before = programs()
  assert sum(before) > 0  # the warm-up's, compiled or read from the cache
  cases = [(q, [], 16, 8, 16), (q, [], 16, 4, 8), (q, [], 12, 4, 12), (q, [], 9, 9, 9), (q, [], 100, 20, 50),
           (long_q, [], 16, 16, 16), (q, [a], 24, 8, 24), (long_q, [a, a], 8, 8, 8)]

  def one(case):
    text, ims, gen, block, steps = case
    return chat(client, user(text, *["a.png"] * len(ims)), temperature=0, max_tokens=gen, block_length=block,
                steps=steps)

  with cf.ThreadPoolExecutor(4) as pool:  # 2 rows running, 2 waiting: within --max-queue
    got = list(pool.map(one, cases))
  for (text, ims, gen, block, steps), r in zip(cases, got):
    want = model.generate([text], [ims], SamplingParams(gen_length=gen, block_length=block, steps=steps))[0]
    assert r.choices[0].message.content == want.text and r.model_extra["nfe"] == want.nfe, (text[:20], len(ims), gen)
    assert r.usage.completion_tokens == len(want.token_ids) <= gen
  assert programs() == before


def test_a_request_beyond_a_launch_limit_is_refused_naming_its_flag(setup):
  url, auth = setup["server"].url, {"Authorization": f"Bearer {KEY}"}
  good = {"model": NAME, "messages": user("hi"), **SHORT}
  cases = [({**good, "max_tokens": 256, "block_length": 8, "steps": 256}, "max_tokens", "--max-answer-tokens"),
           ({**good, "messages": user("word " * 2100)}, "messages", "--max-model-len"),
           ({**good, "messages": user("many", *["a.png"] * 6)}, "messages", "--max-tiles")]
  for body, param, flag in cases:
    r = httpx.post(url + "/v1/chat/completions", headers=auth, json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and flag in r.json()["error"]["message"], \
        (param, r.text)


def test_a_non_streamed_client_that_leaves_frees_its_row(setup, client):
  url = setup["server"].url
  nfe0, left0 = metric(url, "lladav_forward_evaluations_total"), metric(url, "lladav_requests_total", '{status="499"}')
  # four answers of 128 steps in two rows: two waves, longer than the client waits
  body = {"model": NAME, "messages": user("Describe everything, slowly."), "n": 4}
  with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
    httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
  deadline = time.monotonic() + 30
  while metric(url, "lladav_requests_total", '{status="499"}') < left0 + 1 or metric(url, "lladav_busy_rows") > 0:
    assert time.monotonic() < deadline, "the row was not freed"
    time.sleep(0.1)
  assert metric(url, "lladav_forward_evaluations_total") - nfe0 < 4 * 128  # stopped before its 4 x 128 steps
  assert chat(client, user("next"), **SHORT).choices[0].message.content


def test_launch_options_and_a_restart_from_the_compilation_cache(setup, tmp_path):
  """--compilation-cache-dir: the second start of the same server compiles nothing (the log says so).
  --enable-cfg --cache prefix: rows with and without guidance share the engines and each answers as generate."""
  warmups, model, q = [], setup["model"], "What color is the circle?"
  for k in range(2):
    s = ServerProcess(setup["model_dir"], "--max-num-seqs", "2", "--compilation-cache-dir", str(tmp_path / "xla"),
                      "--enable-cfg", "--cache", "prefix", log_path=str(tmp_path / f"server{k}.log"))
    try:
      if k:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=120)
        for scale in (1.5, 0.0):
          got = chat(c, user(q), temperature=0, cfg_scale=scale, **SHORT)
          want = model.generate([q], params=SamplingParams(gen_length=16, block_length=8, steps=16, cfg_scale=scale,
                                                           cache="prefix"))[0]
          assert got.choices[0].message.content == want.text and got.model_extra["nfe"] == want.nfe, scale
    finally:
      s.stop()
    log = (tmp_path / f"server{k}.log").read_text()
    warmups.append(re.search(r"warmed up in ([0-9.]+) s \((\d+) programs compiled", log))
  assert all(warmups), warmups
  assert int(warmups[0].group(2)) > 0 and int(warmups[1].group(2)) == 0


def test_metrics(setup):
  text = httpx.get(setup["server"].url + "/metrics").text
  for name in ("lladav_requests_total{status=\"200\"}", "lladav_queue_depth", "lladav_busy_rows",
               "lladav_tokens_per_second", "lladav_forward_evaluations_per_second",
               "lladav_request_latency_seconds_bucket", "lladav_time_to_first_token_seconds_bucket",
               "lladav_generated_tokens_total", "lladav_compiles", "lladav_compile_cache_hits"):
    assert name in text, name
  assert metric(setup["server"].url, "lladav_time_to_first_token_seconds_count") > 0


def test_sigterm_drains_then_exits_0(setup):
  """Last: it ends the server. In flight: four answers of 128 steps in two rows (two running, two queued),
  streamed with every step's positions (a few seconds)."""
  server = setup["server"]
  body = {"model": NAME, "messages": user("One more, slowly."), "n": 4, "stream": True, "denoise": True}
  with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                    timeout=120) as r:
    it = r.iter_lines()
    first = next(ln for ln in it if ln.startswith("data: "))
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").status_code != 503:
      assert time.monotonic() < deadline
      time.sleep(0.01)
    late = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"})
    assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable"
    lines = [first] + [ln for ln in it if ln.startswith("data: ")]
  assert lines[-1] == "data: [DONE]"  # the in-flight request finished, its queued answers too
  chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
  ends = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
          if c["choices"] and c["choices"][0]["finish_reason"]}
  assert sorted(ends) == [0, 1, 2, 3] and set(ends.values()) <= {"stop", "length"}
  assert server.proc.wait(60) == 0, server.output()
