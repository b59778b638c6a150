"""OpenAI's semantics where a client relies on them, without a server: stop strings act on the text
(`inference.text`: the text never holds one, whatever the tokenisation; a stream never shows part of one and adds
up to the finished text), and OpenAI's request fields this server does not implement get a 400 naming them
(`serve.protocol`), while harmless ones are accepted. The server itself: tests/test_serve.py."""
import itertools
import random

import pydantic
import pytest

from lladav_jax.inference import SamplingParams
from lladav_jax.inference.text import cut_at_stop, finished_text, streamable
from lladav_jax.serve.protocol import ChatRequest, CompletionRequest, validation_error

USER = [{"role": "user", "content": "hi"}]


class CharTokenizer:
  """A token an id: ids 0..9 are the words below, 10 a special token (dropped from the text)."""
  WORDS = ["yellow", " circle", "circle", " red", " ", "T", "~", "TT", "\n", "é"]
  vocab_size = 11

  def decode(self, ids, skip_special=False):
    return "".join(self.WORDS[i] if i < 10 else ("" if skip_special else "<|eot_id|>") for i in ids)


def test_cut_at_the_earliest_stop_string_whatever_the_order():
  assert cut_at_stop("yellow circle", ["circle"]) == ("yellow ", True)
  assert cut_at_stop("a b c", ["c", "b"]) == ("a ", True)  # the earliest occurrence, not the first stop given
  assert cut_at_stop("abc", ["bc", "b"]) == ("a", True)
  assert cut_at_stop("abc", ["x"]) == ("abc", False) and cut_at_stop("abc", []) == ("abc", False)
  assert cut_at_stop("stop", ["stop"]) == ("", True)


def test_finished_text_cuts_where_the_tokens_do_not():
  tok = CharTokenizer()
  # the answer's token is " circle"; the stop string "circle" is another token: the text is cut all the same
  assert finished_text(tok, [0, 1], 99, ["circle"]) == ("yellow ", True)
  assert finished_text(tok, [0, 1], 99, []) == ("yellow circle", False)
  assert finished_text(tok, [5, 5, 6], 99, ["TT"]) == ("", True)
  assert finished_text(tok, [0, 10, 1], 99, ["<|eot_id|>"]) == ("yellow circle", False)  # special tokens are no text
  # masks and ids past the vocabulary are not text
  assert finished_text(tok, [0, 99, 1, 500], 99, ["w c"]) == ("yello", True)
  # the suffix (its last ids) is appended after the cut answer; a stop string in the suffix does not cut it
  assert finished_text(tok, [0, 1, 3], 99, ["circle"], suffix_len=1) == ("yellow  red", True)
  assert finished_text(tok, [0, 3, 1], 99, ["circle"], suffix_len=1) == ("yellow red circle", False)


def test_a_stream_never_shows_part_of_a_stop_string_and_adds_up_to_the_finished_text():
  assert streamable("yellow cir", ["circle"]) == "yellow "
  assert streamable("yellow circle and more", ["circle"]) == "yellow "
  assert streamable("abX", ["c", "abXcZ"]) == ""  # a longer stop may still begin before a shorter one
  assert streamable("yellow", ["\n\n"]) == "yellow" and streamable("yellow\n", ["\n\n"]) == "yellow"
  assert streamable("anything", []) == "anything"
  rng = random.Random(0)
  for _ in range(3000):  # every prefix of every answer: what is sent is a prefix of the final text
    final = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 12)))
    stops = ["".join(rng.choice("abc ") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
    want, _ = cut_at_stop(final, stops)
    sent = ""
    for k in range(len(final) + 1):
      now = streamable(final[:k], stops)
      assert now.startswith(sent) and want.startswith(now), (final, stops, k, now, want)
      assert not any(s in now for s in stops)
      sent = now
    assert not any(s in want for s in stops)


def test_the_original_stop_rule_leaves_the_text_uncut():
  assert SamplingParams(stop=("a", "b")).text_stops == ("a", "b")
  assert SamplingParams(stop=("a", "b"), stop_rule="original").text_stops == ()


def _error(kind, **fields):
  base = {"model": "m", **({"messages": USER} if kind is ChatRequest else {"prompt": "hi"})}
  with pytest.raises(pydantic.ValidationError) as e:
    kind.model_validate({**base, **fields})
  return validation_error(e.value)


UNSUPPORTED = [  # (request kind, fields, the message of the 400)
    (ChatRequest, dict(logprobs=True), "logprobs: not supported by this server (only false)"),
    (ChatRequest, dict(logprobs=True, top_logprobs=2), "logprobs: not supported by this server (only false)"),
    (ChatRequest, dict(top_logprobs=2), "top_logprobs: not supported by this server (only 0)"),
    (ChatRequest, dict(tools=[{"type": "function", "function": {"name": "f"}}]),
     "tools: not supported by this server (no tool calls)"),
    (ChatRequest, dict(tool_choice="required"),
     'tool_choice: not supported by this server (only "none" or "auto", without tools)'),
    (ChatRequest, dict(functions=[{"name": "f"}]), "functions: not supported by this server (no function calls)"),
    (ChatRequest, dict(function_call={"name": "f"}),
     'function_call: not supported by this server (only "none" or "auto", without functions)'),
    (ChatRequest, dict(response_format={"type": "json_object"}),
     'response_format: not supported by this server (only {"type": "text"})'),
    (ChatRequest, dict(logit_bias={"42": 10}), "logit_bias: not supported by this server"),
    (ChatRequest, dict(presence_penalty=0.5), "presence_penalty: not supported by this server (only 0)"),
    (ChatRequest, dict(frequency_penalty=-1), "frequency_penalty: not supported by this server (only 0)"),
    (ChatRequest, dict(top_p=0.9), "top_p: not supported by this server (only 1)"),
    (ChatRequest, dict(modalities=["text", "audio"]), 'modalities: not supported by this server (only ["text"])'),
    (ChatRequest, dict(audio={"voice": "alloy", "format": "wav"}), "audio: not supported by this server (text output only)"),
    (ChatRequest, dict(reasoning_effort="high"), "reasoning_effort: not supported by this server"),
    (CompletionRequest, dict(echo=True), "echo: not supported by this server (only false)"),
    (CompletionRequest, dict(best_of=3), "best_of: not supported by this server (only best_of equal to n)"),
    (CompletionRequest, dict(best_of=3, n=2), "best_of: not supported by this server (only best_of equal to n)"),
    (CompletionRequest, dict(logprobs=2), "logprobs: not supported by this server"),
    (CompletionRequest, dict(suffix=" the end."), "suffix: not supported by this server"),
    (CompletionRequest, dict(presence_penalty=1.0), "presence_penalty: not supported by this server (only 0)"),
]


@pytest.mark.parametrize("kind,fields,message", UNSUPPORTED, ids=[f"{k.__name__}-{'-'.join(f)}" for k, f, _ in UNSUPPORTED])
def test_unimplemented_fields_are_refused_naming_them(kind, fields, message):
  msg, param = _error(kind, **fields)
  assert (msg, param) == (message, message.split(":")[0])


def test_harmless_fields_are_accepted():
  r = ChatRequest.model_validate({
      "model": "m", "messages": USER, "n": 2, "user": "u-1", "metadata": {"k": "v"}, "store": False,
      "parallel_tool_calls": True, "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none",
      "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0, "top_p": 1,
      "logit_bias": {}, "modalities": ["text"], "service_tier": "auto", "safety_identifier": "s",
      "prompt_cache_key": "c", "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}})
  assert r.n == 2 and r.to_sampling_params().gen_length == SamplingParams().gen_length
  c = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "echo": False, "best_of": 2, "n": 2,
                                        "logprobs": None, "user": "u", "top_p": 1.0})
  assert c.n == 2
  # the fields of the other endpoint, and fields OpenAI does not have, are still unknown ones
  assert _error(ChatRequest, echo=True) == ("echo: Extra inputs are not permitted", "echo")
  assert _error(CompletionRequest, tools=[]) == ("tools: Extra inputs are not permitted", "tools")
  assert _error(ChatRequest, top_k=5)[1] == "top_k"


def test_max_completion_tokens_is_max_tokens():
  for a, b in itertools.product((None, 24), (None, 24)):
    r = ChatRequest(model="m", messages=USER, max_tokens=a, max_completion_tokens=b)
    assert r.to_sampling_params().gen_length == (a or b or SamplingParams().gen_length)
  assert _error(ChatRequest, max_tokens=16, max_completion_tokens=24)[1] == "max_completion_tokens"
  assert _error(ChatRequest, max_completion_tokens=0)[1] == "max_completion_tokens"
