"""The LLaMA-3-style chat template of LLaDA-V, for training (with labels) and for inference.

Training (`render_training`) reproduces the original's `preprocess_llada`:
  - one leading BOS, then the system message (default: the original's system prompt), then each
    message rendered as `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`,
    each rendered string tokenised on its own, content NOT trimmed;
  - labels: every assistant (non user/system) message is labelled whole, header and eot included;
    then every token whose id is one of `unmask_tokens` (looked up like HF's
    convert_tokens_to_ids: a vocabulary lookup of the literal string) is labelled wherever it
    occurs, system and user turns included. "\\n\\n" is in that list: with the original's byte-level
    BPE it is not a vocabulary entry and has no effect; with a vocabulary that has it (the demo
    tokenizer) it is labelled, as the original code would do.
Stage 1 (`render_plain`, the original's `preprocess_plain` under `llada_plain`):
  `<image>` + caption + "\\n", no BOS and no template; only the image placeholder is unlabelled.
Inference (`render_inference`) follows the released tokenizer's HF chat template: BOS, content
trimmed, generation prompt `<|start_header_id|>assistant<|end_header_id|>\\n\\n`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from lladav_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE_TAG = "<image>"
DEFAULT_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                  "content that the user provides, and assist the user with a variety of tasks using natural "
                  "language.")
ROLE_MAP = {"human": "user", "gpt": "assistant"}
NOISY_TAG = "QA_GT_caption_based_noisy"


@dataclasses.dataclass(frozen=True)
class LabelConfig:
  """Each quirk of the original's labelling behind a switch; the defaults are the original's."""
  system_message: str = DEFAULT_SYSTEM
  # Token strings labelled wherever they occur (`unmask_tokens` of preprocess_llada).
  unmask_tokens: tuple = ("<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n\n")
  # Assistant messages are labelled including `<|start_header_id|>assistant<|end_header_id|>\n\n`.
  label_assistant_header: bool = True
  # "if roles[source[0]['from']] != 'user': source = source[1:]"
  drop_leading_non_user: bool = True
  # preprocess_multimodal: a turn with exactly one <image> not at its start -> "<image>\n" + text.
  move_image_to_front: bool = True
  # preprocess_multimodal also deletes the string "QA_GT_caption_based_noisy" (VideoInstruct data).
  strip_noisy_tag: bool = True
  # The collator pads input_ids AND labels with the pad id (= EOS), so padding is noised and trained on.
  pad_with_eos: bool = True
  label_eos_padding: bool = True
  # Stage-1 separator (conv_llada_plain.sep).
  plain_separator: str = "\n"


def normalize_role(role: str) -> str:
  return ROLE_MAP.get(role, role)


def normalize_image_tags(messages: Sequence[tuple[str, str]], cfg: LabelConfig = LabelConfig()):
  """preprocess_multimodal (applied by the original only to samples with an image or video)."""
  out = []
  for role, text in messages:
    if cfg.move_image_to_front and text.count(IMAGE_TAG) == 1 and not text.startswith(IMAGE_TAG):
      text = (IMAGE_TAG + "\n" + text.replace(IMAGE_TAG, "").strip()).strip()
    if cfg.strip_noisy_tag:
      text = text.replace(NOISY_TAG, "")
    out.append((role, text))
  return out


def training_messages(messages: Sequence[tuple[str, str]], cfg: LabelConfig = LabelConfig()):
  """Roles mapped (human -> user, gpt -> assistant) and, as the original, a first turn that is
  not the user's dropped: the messages render_training renders."""
  messages = [(normalize_role(r), c) for r, c in messages]
  if cfg.drop_leading_non_user and messages and messages[0][0] != "user":
    messages = messages[1:]
  return messages


def has_answer(messages: Sequence[tuple[str, str]]) -> bool:
  """Whether any rendered message is labelled as an answer (a role other than user/system)."""
  return any(r not in ("user", "system") for r, _ in messages)


def _message(tok, role: str, content: str) -> str:
  s = tok.special_strings
  return f"{s['start_header']}{role}{s['end_header']}\n\n{content}{s['eot']}"


def _unmask_ids(tok, cfg: LabelConfig) -> set[int]:
  ids = set()
  for t in cfg.unmask_tokens:
    i = tok.token_to_id(t)
    if i is not None:
      ids.add(i)
  return ids


def render_training(tok, messages: Sequence[tuple[str, str]], cfg: LabelConfig = LabelConfig()):
  """(role, content) messages -> (input_ids, labels) exactly as preprocess_llada.

  Roles `human`/`gpt` are mapped to `user`/`assistant`; other roles are kept as written. Image
  tags become IMAGE_TOKEN_INDEX (label IGNORE_INDEX). The caller has applied
  `normalize_image_tags` where the original would.
  """
  messages = training_messages(messages, cfg)
  ids = [tok.bos_id] + tok.encode(_message(tok, "system", cfg.system_message))
  labels = [IGNORE_INDEX] * len(ids)
  for role, content in messages:
    e = tok.encode(_message(tok, role, content))
    ids += e
    if role in ("user", "system"):
      labels += [IGNORE_INDEX] * len(e)
    elif cfg.label_assistant_header:
      labels += e
    else:  # label the message without its header (tokens shared with the header stay unlabelled)
      head = tok.encode(_message(tok, role, "")[:-len(tok.special_strings["eot"])])
      n = 0
      while n < min(len(head), len(e)) and head[n] == e[n]:
        n += 1
      labels += [IGNORE_INDEX] * n + e[n:]
  return _finish(tok, ids, labels, cfg)


def _finish(tok, ids, labels, cfg):
  unmask = _unmask_ids(tok, cfg)
  for i, t in enumerate(ids):
    if t in unmask:
      labels[i] = t
    if t == IMAGE_TOKEN_INDEX:
      labels[i] = IGNORE_INDEX
  return ids, labels


def render_plain(tok, messages: Sequence[tuple[str, str]], cfg: LabelConfig = LabelConfig()):
  """Stage-1 `llada_plain`: `<image>` + caption + sep; only the image placeholder is unlabelled.

  The first message must contain `<image>` (it is replaced by exactly `<image>`, as the original
  does); the second is the caption. Raises ValueError otherwise.
  """
  if len(messages) != 2:
    raise ValueError(f"a plain (stage-1) record needs exactly 2 turns, got {len(messages)}")
  if IMAGE_TAG not in messages[0][1]:
    raise ValueError("the first turn of a plain (stage-1) record has no <image>")
  ids = tok.encode(IMAGE_TAG + messages[1][1] + cfg.plain_separator)
  prefix = len(tok.encode(IMAGE_TAG))
  labels = [IGNORE_INDEX] * prefix + ids[prefix:]
  return ids, labels


def render_inference(tok, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
  """The released tokenizer's chat template: BOS + messages (content trimmed) + generation prompt."""
  s = tok.special_strings
  text = s["bos"] + "".join(_message(tok, normalize_role(r), c.strip()) for r, c in messages)
  if add_generation_prompt:
    text += f"{s['start_header']}assistant{s['end_header']}\n\n"
  return tok.encode(text)


def question_with_images(question: str, num_images: int) -> str:
  """lmms-eval / the demo: with images and no `<image>` in the text, prepend
  `" ".join(["<image>"] * n) + "\\n"` (one image: "<image>\\n" + question)."""
  if num_images and IMAGE_TAG not in question:
    return " ".join([IMAGE_TAG] * num_images) + "\n" + question
  return question


def inference_prompt_ids(tok, question: str, num_images: int, system: str | None = DEFAULT_SYSTEM) -> list[int]:
  """Prompt ids for one question about `num_images` images (IMAGE_TOKEN_INDEX placeholders),
  ending with the assistant generation header, as the original's eval and demo build them."""
  msgs = [("system", system)] if system else []
  msgs.append(("user", question_with_images(question, num_images)))
  return render_inference(tok, msgs, add_generation_prompt=True)
