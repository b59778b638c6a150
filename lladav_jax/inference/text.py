"""Token ids to text, and the stops: the one place each rule is written (offline generation, the eval
CLI and plugin, the server).

Stops act twice. The engine searches each stop string's token ids in the committed answer (`stop_list`): a row
ends at the earliest occurrence and the ids before it are the answer (`answer_ids`). The text is then cut at the
earliest occurrence of any stop string (`finished_text`), as OpenAI and vLLM define stops: the returned text never
contains one, whatever the tokenisation (a stop string may be tokenised differently from the same characters in
an answer: "circle" alone vs the answer's " circle"). A stream sends only what no later token can change
(`streamable`)."""
from __future__ import annotations

from typing import Optional, Sequence


def stop_list(eot_id: Optional[int], stop_ids: Sequence[Sequence[int]]) -> list[list[int]]:
  """The stops of a request: `stop_ids` in order, empty ones and repeats dropped, then `eot_id` unless it is
  one of them (the original always adds "<|eot_id|>" after its stopping_criteria, once; callers pass only
  their own stops)."""
  out = []
  for s in [list(s) for s in stop_ids] + ([[eot_id]] if eot_id is not None else []):
    if s and s not in out:  # a repeat finds nothing new; it would only take a stop slot
      out.append(s)
  return out


def answer_ids(response: Sequence[int], stop: int, gen_length: int, suffix_ids: Sequence[int] = ()) -> list[int]:
  """A finished row's answer: the ids before the stop, then the suffix."""
  return [int(i) for i in response[:min(int(stop), gen_length)]] + list(suffix_ids)


def answer_text(tok, ids: Sequence[int], mask_id: int, skip_special_tokens: bool = True) -> str:
  """The text of answer ids: masks (never committed) and ids past the tokenizer's vocabulary are not text. No
  stop string is applied here: a finished answer's text is `finished_text`'s."""
  return tok.decode([i for i in ids if i != mask_id and 0 <= i < tok.vocab_size], skip_special=skip_special_tokens)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
  """The text before the earliest occurrence of any stop string, and whether one occurred."""
  at = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
  return (text[:at], True) if at >= 0 else (text, False)


def finished_text(tok, ids: Sequence[int], mask_id: int, stops: Sequence[str] = (), suffix_len: int = 0,
                  skip_special_tokens: bool = True) -> tuple[str, bool]:
  """A finished answer's text and whether a stop string cut it: the text of `ids` (the answer, then
  `suffix_len` suffix ids) cut before the earliest stop string in the answer's text, the suffix's text after
  it. Uncut, it is the text of all the ids (`answer_text`)."""
  whole = answer_text(tok, ids, mask_id, skip_special_tokens)
  if not stops:
    return whole, False
  n = len(ids) - suffix_len
  text, cut = cut_at_stop(answer_text(tok, ids[:n], mask_id, skip_special_tokens) if suffix_len else whole, stops)
  if not cut:
    return whole, False
  return text + (answer_text(tok, ids[n:], mask_id, skip_special_tokens) if suffix_len else ""), True


def streamable(text: str, stops: Sequence[str]) -> str:
  """Of the text of an answer's final prefix (more may follow), what a stream may send now: the text before
  the earliest stop string, less the trailing characters that could be the start of one (held back as vLLM
  does), so a stream never shows any part of a stop string and its deltas add up to `finished_text`."""
  cut, _ = cut_at_stop(text, stops)
  longest = max((len(s) for s in stops), default=0)
  for start in range(max(0, len(text) - longest + 1), len(cut)):  # a stop the next characters may complete
    if any(len(s) > len(text) - start and s.startswith(text[start:]) for s in stops):
      return text[:start]
  return cut


def token_pieces(tok, ids: Sequence[int]) -> list[str]:
  """Each answer token's text on its own (special tokens kept visible)."""
  if tok is None:
    return [f"<{int(i)}>" for i in ids]
  return [tok.decode([int(i)]) if 0 <= int(i) < tok.vocab_size else f"<{int(i)}>" for i in ids]
