"""Token ids to text, and the stop list: the one place each rule is written (offline generation, the eval
CLI and plugin, the server)."""
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
  """The text of answer ids: masks (never committed) and ids past the tokenizer's vocabulary are not text."""
  return tok.decode([i for i in ids if i != mask_id and 0 <= i < tok.vocab_size], skip_special=skip_special_tokens)


def token_pieces(tok, ids: Sequence[int]) -> list[str]:
  """Each answer token's text on its own (special tokens kept visible)."""
  if tok is None:
    return [f"<{int(i)}>" for i in ids]
  return [tok.decode([int(i)]) if 0 <= int(i) < tok.vocab_size else f"<{int(i)}>" for i in ids]
