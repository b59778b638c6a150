"""The LLaDA tokenizer: `tokenizer.json` through the `tokenizers` library, special ids by name.

Special tokens are looked up by their strings (never hard-coded ids), taken from
tokenizer_config.json / special_tokens_map.json where they name them, else the original's
strings. `<image>` in text becomes IMAGE_TOKEN_INDEX (-200), as the original's
`tokenizer_image_token` (and `preprocess_llada`, which adds `<image>` as a special token) does:
the text is split at each `<image>` and the pieces are encoded separately.
No BOS/EOS is ever added by `encode` (the original's add_bos_token = add_eos_token = false).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from tokenizers import Tokenizer as HFTokenizer

from lladav_jax.config import IMAGE_TOKEN_INDEX

IMAGE_TAG = "<image>"

# attribute -> (config key naming it, the original's string)
SPECIAL_TOKENS = {
    "bos": ("bos_token", "<|startoftext|>"),
    "eos": ("eos_token", "<|endoftext|>"),
    "pad": ("pad_token", "<|endoftext|>"),
    "mask": (None, "<|mdm_mask|>"),
    "start_header": (None, "<|start_header_id|>"),
    "end_header": (None, "<|end_header_id|>"),
    "eot": (None, "<|eot_id|>"),
}


def _token_str(v):
  if isinstance(v, dict):  # {"content": "<|...|>", "lstrip": ...}
    return v.get("content")
  return v


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer` with the special ids LLaDA-V needs."""

  def __init__(self, tk, special_strings: dict[str, str], source: str = "<memory>"):
    self._tk = tk
    self.source = source
    self.special_strings = dict(special_strings)
    ids = {}
    for name, s in special_strings.items():
      i = tk.token_to_id(s)
      if i is None:
        raise ValueError(f"{source}: special token {s!r} ({name}) is not in the vocabulary of "
                         f"{os.path.join(source, 'tokenizer.json')}")
      ids[name] = i
    self.bos_id: int = ids["bos"]
    self.eos_id: int = ids["eos"]
    self.pad_id: int = ids["pad"]
    self.mask_id: int = ids["mask"]
    self.start_header_id: int = ids["start_header"]
    self.end_header_id: int = ids["end_header"]
    self.eot_id: int = ids["eot"]
    # Ids need not be contiguous (the released specials sit at 126080-126348): the model's embedding
    # must cover the largest id, not the number of entries.
    self.vocab_size: int = max(tk.get_vocab(with_added_tokens=True).values()) + 1

  # ------------------------------------------------------------------ loading
  @classmethod
  def from_dir(cls, path: str) -> "Tokenizer":
    """Loads `path/tokenizer.json` (+ tokenizer_config.json / special_tokens_map.json if present)."""
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tj):
      raise FileNotFoundError(f"no tokenizer.json in {path!r} (the `tokenizers` library format is required)")
    tk = HFTokenizer.from_file(tj)
    named = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
      f = os.path.join(path, fname)
      if os.path.exists(f):
        with open(f) as fh:
          try:
            d = json.load(fh)
          except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None
        for key in ("bos_token", "eos_token", "pad_token"):
          if _token_str(d.get(key)):
            named[key] = (_token_str(d[key]), f)
    strings, where = {}, {}
    for name, (key, default) in SPECIAL_TOKENS.items():
      s, src = named.get(key, (default, tj)) if key else (default, tj)
      strings[name], where[name] = s, src
    for name, s in strings.items():
      if tk.token_to_id(s) is None:
        raise ValueError(f"special token {s!r} ({name}, named in {where[name]}) is missing from the "
                         f"vocabulary of {tj}")
    return cls(tk, strings, source=path)

  # ------------------------------------------------------------------ text <-> ids
  def _encode_plain(self, text: str) -> list[int]:
    if not text:
      return []
    return list(self._tk.encode(text, add_special_tokens=False).ids)

  def encode(self, text: str) -> list[int]:
    """Token ids, no BOS/EOS added; each literal `<image>` becomes IMAGE_TOKEN_INDEX."""
    parts = text.split(IMAGE_TAG)
    out = self._encode_plain(parts[0])
    for p in parts[1:]:
      out.append(IMAGE_TOKEN_INDEX)
      out += self._encode_plain(p)
    return out

  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
    """Text of `ids`; IMAGE_TOKEN_INDEX is shown as `<image>` (dropped with skip_special); other
    negative ids (IGNORE_INDEX) and ids past the vocabulary decode to nothing."""
    out, run = [], []

    def flush():
      if run:
        out.append(self._tk.decode(run, skip_special_tokens=skip_special))
        run.clear()

    for i in ids:
      i = int(i)
      if i == IMAGE_TOKEN_INDEX:
        flush()
        if not skip_special:
          out.append(IMAGE_TAG)
      elif i >= 0:  # ids past the vocabulary (a model's padded embedding rows) decode to nothing, as HF
        run.append(i)
      # other negative ids (IGNORE_INDEX in labels) are not tokens: dropped
    flush()
    return "".join(out)

  def token_to_id(self, token: str) -> int | None:
    """Vocabulary lookup of one token string (like HF convert_tokens_to_ids; None if absent)."""
    return self._tk.token_to_id(token)

  def id_to_token(self, i: int) -> str | None:
    return self._tk.id_to_token(int(i))

  def encode_stop_strings(self, stops: Sequence[str]) -> list[list[int]]:
    """Each stop string tokenised as the original does (`tokenizer(s).input_ids`, no BOS)."""
    out = []
    for s in stops:
      ids = self.encode(s)
      if not ids:
        raise ValueError(f"stop string {s!r} encodes to no tokens")
      out.append(ids)
    return out

  def __repr__(self):
    return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos=pad={self.eos_id}, "
            f"mask={self.mask_id}, eot={self.eot_id})")
