"""The wire format of the OpenAI-compatible API (pydantic): the request bodies of POST /v1/chat/completions and
/v1/completions, with the diffusion settings as extra fields, and the response and stream chunk bodies. Unknown
request fields are refused (a misspelt setting is an error, not silently the default); OpenAI's fields this
server does not implement (`UNSUPPORTED`: logprobs, tools, penalties, ...) are refused with a message saying so,
unless their value asks for nothing (`logprobs: false`, `presence_penalty: 0`, `tools: []`, ...); harmless
ones (`user`, `metadata`, `store`, `parallel_tool_calls`, ...) are accepted and ignored.
`_SamplingRequest.to_sampling_params` is the one conversion from a request to the inference code's
`SamplingParams`."""
from __future__ import annotations

import random
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lladav_jax.inference import ParamsError, SamplingParams

MAX_STOPS = 4  # OpenAI's limit; the eot stop comes on top
STOP_TOKENS = 16  # the longest stop sequence in tokens (the engine's fixed stop bucket)


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
  url: str
  detail: Optional[Literal["auto", "low", "high"]] = None  # accepted, ignored: the model's own tiling applies


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class ImagePart(_Strict):
  type: Literal["image_url"]
  image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
  role: Literal["system", "user", "assistant"]
  content: Union[str, list[Part]]
  name: Optional[str] = None  # accepted, ignored


class StreamOptions(_Strict):
  include_usage: bool = False
  include_obfuscation: Optional[bool] = None  # accepted, ignored: chunks carry no obfuscation padding


# OpenAI request fields this server does not implement: field -> (the values that ask for nothing, accepted and
# ignored like a null or a missing field; a note on what is accepted). Any other value: 400 naming the field.
_UNSUPPORTED_BOTH = {
    "top_p": ((1,), "only 1"),
    "presence_penalty": ((0,), "only 0"),
    "frequency_penalty": ((0,), "only 0"),
    "logit_bias": (({},), None),
}
_UNSUPPORTED_CHAT = {
    **_UNSUPPORTED_BOTH,
    "logprobs": ((False,), "only false"),
    "top_logprobs": ((0,), "only 0"),
    "tools": (([],), "no tool calls"),
    "tool_choice": (("none", "auto"), 'only "none" or "auto", without tools'),
    "functions": (([],), "no function calls"),
    "function_call": (("none", "auto"), 'only "none" or "auto", without functions'),
    "response_format": (({"type": "text"},), 'only {"type": "text"}'),
    "modalities": ((["text"],), 'only ["text"]'),
    "audio": ((), "text output only"),
    "prediction": ((), None),
    "reasoning_effort": ((), None),
    "verbosity": ((), None),
    "web_search_options": ((), None),
    "moderation": ((), None),
}
_UNSUPPORTED_COMPLETION = {
    **_UNSUPPORTED_BOTH,
    "logprobs": ((), None),
    "echo": ((False,), "only false"),
    "best_of": ((), "only best_of equal to n"),  # (n itself: see _unsupported)
    "suffix": ((), None),
}


class _SamplingRequest(_Strict):
  """The fields of a request that set its sampling; unset optional ones take `SamplingParams`'s defaults."""
  UNSUPPORTED: ClassVar[dict] = _UNSUPPORTED_BOTH
  model: str
  max_tokens: Optional[int] = Field(None, gt=0)  # SamplingParams.gen_length
  temperature: Optional[float] = Field(None, ge=0)
  seed: Optional[int] = None  # None: a random seed per request (an explicit one reproduces generate's)
  stop: Union[str, list[str], None] = None
  n: int = Field(1, ge=1, le=16)
  stream: bool = False
  stream_options: Optional[StreamOptions] = None
  user: Optional[str] = None  # accepted, ignored
  # diffusion settings (extra body fields)
  steps: Optional[int] = Field(None, gt=0)
  block_length: Optional[int] = Field(None, gt=0)
  cfg_scale: Optional[float] = Field(None, ge=0)
  threshold: Optional[float] = Field(None, ge=0, le=1)
  factor: Optional[float] = Field(None, gt=0)
  remasking: Optional[Literal["low_confidence", "random"]] = None
  cache: Optional[Literal["prefix", "dual"]] = None
  refresh_interval: Optional[int] = Field(None, ge=1)
  denoise: bool = False  # streaming: every step's answer positions too (the web page's live view)

  @model_validator(mode="before")
  @classmethod
  def _unsupported(cls, body):
    """OpenAI's fields this server does not implement: refused naming the field, unless their value asks for
    nothing (then dropped)."""
    if not isinstance(body, dict):
      return body
    for name, (unused, note) in cls.UNSUPPORTED.items():
      v = body.get(name)
      if not (v is None or v in unused or (name == "best_of" and v == body.get("n", 1))):
        raise _field_error(name, "not supported by this server" + (f" ({note})" if note else ""))
    return {k: v for k, v in body.items() if k not in cls.UNSUPPORTED}

  @model_validator(mode="after")
  def _consistent(self):
    if self.denoise and not self.stream:
      raise _field_error("denoise", "denoise needs stream: true")
    if len(self.stops) > MAX_STOPS:
      raise _field_error("stop", f"at most {MAX_STOPS} stop strings")
    return self

  @property
  def stops(self) -> list[str]:
    return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

  def to_sampling_params(self) -> SamplingParams:
    """This request's SamplingParams (the model's token ids not yet set: `for_model`); a setting that
    does not fit raises FieldError naming the request's field."""
    given = {"gen_length": self.max_tokens, "steps": self.steps, "block_length": self.block_length,
             "temperature": self.temperature, "cfg_scale": self.cfg_scale, "threshold": self.threshold,
             "factor": self.factor, "remasking": self.remasking, "cache": self.cache,
             "refresh_interval": self.refresh_interval}
    params = SamplingParams(**{k: v for k, v in given.items() if v is not None}, stop=tuple(self.stops),
                            seed=self.seed if self.seed is not None else random.getrandbits(31))
    try:
      return params.validate()
    except ParamsError as e:
      field = {"gen_length": "max_tokens"}.get(e.field, e.field)
      raise FieldError(field, "; ".join(m for _, m in e.problems)) from None


class ChatRequest(_SamplingRequest):
  """POST /v1/chat/completions."""
  UNSUPPORTED: ClassVar[dict] = _UNSUPPORTED_CHAT
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: Optional[int] = Field(None, gt=0)  # OpenAI's newer name of max_tokens
  # accepted, ignored: nothing is stored, no tool is called, no tier or prompt cache to choose
  metadata: Optional[dict[str, str]] = None
  store: Optional[bool] = None
  parallel_tool_calls: Optional[bool] = None
  safety_identifier: Optional[str] = None
  prompt_cache_key: Optional[str] = None
  prompt_cache_retention: Optional[str] = None
  service_tier: Optional[str] = None

  @model_validator(mode="after")
  def _last_is_the_users(self):
    if self.messages[-1].role != "user":
      raise _field_error("messages", "the last message must be the user's")
    if self.max_completion_tokens is not None:
      if self.max_tokens not in (None, self.max_completion_tokens):
        raise _field_error("max_completion_tokens", f"max_completion_tokens={self.max_completion_tokens} and "
                           f"max_tokens={self.max_tokens} differ (give one)")
      self.max_tokens = self.max_completion_tokens
    return self


class CompletionRequest(_SamplingRequest):
  """POST /v1/completions: a raw text prompt, continued without the chat template."""
  UNSUPPORTED: ClassVar[dict] = _UNSUPPORTED_COMPLETION
  prompt: str = Field(min_length=1)


# ----------------------------------------------------------------------------- responses

class _Out(BaseModel):
  model_config = ConfigDict(extra="allow")  # the diffusion counters (nfe, steps, denoise) ride along


class Usage(_Out):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int


class AssistantMessage(_Out):
  role: Literal["assistant"] = "assistant"
  content: str


class Choice(_Out):
  index: int
  message: AssistantMessage
  finish_reason: Optional[Literal["stop", "length"]]
  nfe: int  # forward evaluations of this choice
  steps: int  # denoising steps


class _Body(_Out):
  """What every response and chunk body starts with; `object` names its kind."""
  id: str
  object: str
  created: int
  model: str


class ChatCompletion(_Body):
  object: Literal["chat.completion"] = "chat.completion"
  choices: list[Choice]
  usage: Usage
  nfe: int


class Delta(_Out):
  role: Optional[Literal["assistant"]] = None
  content: Optional[str] = None


class ChunkChoice(_Out):
  index: int
  delta: Delta
  finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(_Body):
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  choices: list[ChunkChoice]


class CompletionChoice(_Out):
  index: int
  text: str
  finish_reason: Optional[Literal["stop", "length"]]
  logprobs: None = None
  nfe: int
  steps: int


class Completion(_Body):
  object: Literal["text_completion"] = "text_completion"
  choices: list[CompletionChoice]
  usage: Usage
  nfe: int


class CompletionChunkChoice(_Out):
  index: int
  text: str
  finish_reason: Optional[Literal["stop", "length"]] = None


class CompletionChunk(_Body):
  object: Literal["text_completion"] = "text_completion"
  choices: list[CompletionChunkChoice]


def wire(body: BaseModel) -> dict[str, Any]:
  """A response model as JSON: the fields it was built with (an OpenAI body has no nulls it did not set)."""
  return body.model_dump(exclude_unset=True)


class FieldError(ValueError):
  """A request field that is well-typed but wrong; `param` names it as OpenAI's error bodies do."""

  def __init__(self, param: Optional[str], message: str, status: int = 400):
    super().__init__(message)
    self.param, self.message, self.status = param, message, status


def _field_error(param: str, message: str) -> ValueError:
  # raised inside a validator: pydantic wraps a ValueError into its error list; the prefix keeps the field
  return ValueError(f"{param}: {message}")


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
  """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
  kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
          503: "service_unavailable"}.get(status, "invalid_request_error" if status < 500 else "server_error")
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(e) -> tuple[str, Optional[str]]:
  """The message and dotted field of a pydantic ValidationError's first error (a model-level check names
  its field as 'field: message')."""
  err = e.errors()[0]
  msg = str(err.get("msg", "")).removeprefix("Value error, ")
  loc = [str(x) for x in err.get("loc", ()) if not (isinstance(x, str) and x in ("str", "list[...]"))]
  loc = [x for x in loc if not x.startswith(("function-", "tagged-union"))]
  if loc:
    param = ".".join(loc)
  else:
    head = msg.split(":", 1)
    param = head[0] if len(head) == 2 and head[0].isidentifier() else None
  msg = msg if msg.startswith(f"{param}:") else f"{param or 'body'}: {msg}"
  more = f" (and {e.error_count() - 1} more errors)" if e.error_count() > 1 else ""
  return msg + more, param
