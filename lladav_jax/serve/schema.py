"""The request body of POST /v1/chat/completions (OpenAI's schema, pydantic), with the diffusion settings as
extra fields. Unknown fields are refused (a misspelt setting is an error, not silently the default)."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class ChatRequest(_Strict):
  model: str
  messages: list[Message] = Field(min_length=1)
  max_tokens: Optional[int] = Field(None, gt=0)  # the answer length (LLaDAV.generate's gen_length)
  temperature: float = Field(0.0, ge=0)
  seed: Optional[int] = None  # None: a random seed per request (an explicit one reproduces generate's)
  stop: Union[str, list[str], None] = None
  n: int = Field(1, ge=1, le=16)
  stream: bool = False
  stream_options: Optional[StreamOptions] = None
  user: Optional[str] = None  # accepted, ignored
  # diffusion settings (extra body fields); the defaults are LLaDAV.generate's
  steps: Optional[int] = Field(None, gt=0)  # default: max_tokens (a token a step)
  block_length: Optional[int] = Field(None, gt=0)  # default: max_tokens (one block)
  cfg_scale: float = Field(0.0, ge=0)
  threshold: Optional[float] = Field(None, ge=0, le=1)
  factor: Optional[float] = Field(None, gt=0)
  remasking: Literal["low_confidence", "random"] = "low_confidence"
  cache: Optional[Literal["prefix", "dual"]] = None
  refresh_interval: int = Field(32, ge=1)
  denoise: bool = False  # streaming: every step's answer positions too (the web page's live view)

  @model_validator(mode="after")
  def _consistent(self):
    g = self.gen_length
    bl = self.block_length or g
    if g % bl:
      raise _field_error("block_length", f"max_tokens={g} must be a multiple of block_length={bl}")
    steps = self.steps or g
    if steps % (g // bl):
      raise _field_error("steps", f"steps={steps} must be a multiple of the number of blocks {g // bl}")
    if self.threshold is not None and self.factor is not None:
      raise _field_error("threshold", "give threshold or factor, not both")
    if self.denoise and not self.stream:
      raise _field_error("denoise", "denoise needs stream: true")
    if len(self.stops) > MAX_STOPS:
      raise _field_error("stop", f"at most {MAX_STOPS} stop strings")
    if any(not s for s in self.stops):
      raise _field_error("stop", "a stop string is empty")
    if self.messages[-1].role != "user":
      raise _field_error("messages", "the last message must be the user's")
    return self

  @property
  def gen_length(self) -> int:
    return self.max_tokens or 128

  @property
  def stops(self) -> list[str]:
    return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

  def sampler_kwargs(self) -> dict:
    """The LLaDAV.generate keyword arguments of this request."""
    g = self.gen_length
    return dict(gen_length=g, block_length=self.block_length or g, steps=self.steps or g,
                temperature=self.temperature, remasking=self.remasking, cfg_scale=self.cfg_scale,
                threshold=self.threshold, factor=self.factor, cache=self.cache, refresh_interval=self.refresh_interval)


class FieldError(ValueError):
  """A request field that is well-typed but wrong; `param` names it as OpenAI's error bodies do."""

  def __init__(self, param: Optional[str], message: str, status: int = 400):
    super().__init__(message)
    self.param, self.message, self.status = param, message, status


def _field_error(param: str, message: str) -> ValueError:
  # raised inside a validator: pydantic wraps a ValueError into its error list; the prefix keeps the field
  return ValueError(f"{param}: {message}")
