"""The built-in demo data: a synthetic visual-instruction set a tiny model learns on a CPU.

Scenes are 56x56 PNGs: a white canvas split into a 2x2 grid of 28 px cells (one patch of a 28 px
ViT, 2x2 patches of a 14 px one), one cell holding a flat-coloured shape (circle, square, triangle
in red, green, blue, yellow). Questions are templated (its colour, its shape, what it is; the
colour of the shape in the first or second of two images), answers are 1-2 words. Records are
single-turn LLaVA JSON (`human`/`gpt`), 10% of them with two images, in train / validation / test
splits. A matching word-level tokenizer (`tokenizer.json` + tokenizer_config.json +
special_tokens_map.json, the original's special-token strings, vocabulary < 512) is written next
to it with the `tokenizers` library.

    paths = ensure_demo_data("/tmp/demo")      # generated once (atomically), then reused
    tok = Tokenizer.from_dir(paths["tokenizer_dir"])
    cfg = demo_data_config(paths)              # pipeline.DataConfig for build_train_iterator
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile

from PIL import Image, ImageDraw
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from lladav_jax.data.pipeline import DataConfig
from lladav_jax.data.template import DEFAULT_SYSTEM
from lladav_jax.multimodal import ImageConfig

VERSION = 4
IMAGE_SIZE = 56
CELL = 28
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 195, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]", "<|mdm_mask|>", "<role>", "</role>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|unk|>")
# The released tokenizer's chat template (LLaMA-3 style, content trimmed).
HF_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
PRETOKENIZE = r"\n\n|\n| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]| "


def demo_image_config(patch_size: int = 14) -> ImageConfig:
  """56 px tiles (anyres as the original) for a vision tower with `patch_size` px patches:
  28 for config.small (one patch per scene cell), 14 for config.tiny."""
  return ImageConfig(image_size=IMAGE_SIZE, patch_size=patch_size)


# ----------------------------------------------------------------------------- scenes

def draw_scene(cells) -> Image.Image:
  """cells: 4 entries (row-major 2x2), each None or (color, shape)."""
  img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
  d = ImageDraw.Draw(img)
  for k, c in enumerate(cells):
    if c is None:
      continue
    color, shape = c
    x0, y0 = (k % 2) * CELL + 4, (k // 2) * CELL + 4
    x1, y1 = x0 + CELL - 9, y0 + CELL - 9
    fill = COLORS[color]
    if shape == "circle":
      d.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":  # larger than the circle: the two differ in area, not only in their corners
      d.rectangle((x0 - 2, y0 - 2, x1 + 2, y1 + 2), fill=fill)
    else:
      d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
  return img


def random_scene(rng: random.Random):
  """One shape in a random cell: with several, where a question must first find its shape, the demo
  model does not learn the task in the demo's steps (bench/demo_steps.py's notes)."""
  cells = [None] * 4
  cells[rng.randrange(4)] = (rng.choice(list(COLORS)), rng.choice(SHAPES))
  return cells


def _the_object(cells):
  (color, shape), = [c for c in cells if c is not None]
  return color, shape


def single_image_qa(rng: random.Random, cells):
  """One templated (question, answer) about a one-shape scene."""
  color, shape = _the_object(cells)
  kind = rng.choice(("color", "shape", "what"))
  if kind == "color":
    return "What color is the shape?", color
  if kind == "shape":
    return "What shape is the object?", shape
  return "What is in the image?", f"{color} {shape}"


def two_image_qa(rng: random.Random, a, b):
  which = rng.choice(("first", "second"))
  return f"What color is the shape in the {which} image?", _the_object(a if which == "first" else b)[0]


def _tags(n: int) -> str:
  # The same layout the eval uses (template.question_with_images): "<image> <image>\n".
  return " ".join(["<image>"] * n) + "\n"


def generate_split(rng: random.Random, n: int, split: str, image_dir: str, rel_prefix: str):
  """Single-turn records: 90% one image, 10% two images."""
  records = []
  for i in range(n):
    rid = f"{split}-{i:05d}"
    scenes = [random_scene(rng) for _ in range(2 if rng.random() < 0.1 else 1)]
    names = []
    for j, cells in enumerate(scenes):
      name = f"{rel_prefix}/{rid}" + (f"-{j}" if len(scenes) > 1 else "") + ".png"
      draw_scene(cells).save(os.path.join(image_dir, os.path.basename(name)))
      names.append(name)
    q, ans = single_image_qa(rng, scenes[0]) if len(scenes) == 1 else two_image_qa(rng, *scenes)
    conv = [{"from": "human", "value": _tags(len(scenes)) + q}, {"from": "gpt", "value": ans}]
    records.append({"id": rid, "image": names[0] if len(names) == 1 else names, "conversations": conv})
  return records


# ----------------------------------------------------------------------------- tokenizer

def build_tokenizer(texts, out_dir: str, model_max_length: int = 256, special_ids: dict[str, int] | None = None):
  """A word-level `tokenizers` tokenizer over `texts` (+ printable ASCII), the original's specials:
  after the words, or at `special_ids` ({"<|mdm_mask|>": 126336, ...}: the released ids) where given."""
  pre = pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated")
  pieces = set()
  for t in texts:
    for piece, _ in pre.pre_tokenize_str(t):
      pieces.add(piece)
  pieces |= {chr(c) for c in range(32, 127)} | {"\n", "\n\n"}
  vocab = {p: i for i, p in enumerate(sorted(pieces))}
  for s in SPECIAL_TOKENS:
    vocab[s] = (special_ids or {}).get(s, len(vocab))
  tk = HFTokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
  tk.pre_tokenizer = pre
  tk.decoder = decoders.Fuse()
  tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
  os.makedirs(out_dir, exist_ok=True)
  tk.save(os.path.join(out_dir, "tokenizer.json"))
  added = {str(vocab[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True} for s in SPECIAL_TOKENS}
  config = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|unk|>",
            "chat_template": HF_CHAT_TEMPLATE, "model_max_length": model_max_length,
            "padding_side": "right", "clean_up_tokenization_spaces": False,
            "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=1)
  smap = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
          "unk_token": "<|unk|>", "additional_special_tokens": [s for s in SPECIAL_TOKENS if s not in
                                                                ("<|startoftext|>", "<|endoftext|>", "<|unk|>")]}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(smap, f, indent=1)
  return max(vocab.values()) + 1


def _corpus_texts():
  """Every string the templates can produce (so the demo never hits <|unk|>), and a few more
  (counts, "Is there ...", "Which image ...") that tests write by hand."""
  words = set(NUMBERS) | set(COLORS) | set(SHAPES) | {"nothing", "yes", "no", "first", "second", "object",
                                                         "system", "user", "assistant"}
  texts = [DEFAULT_SYSTEM, "system", "user", "assistant"]
  texts += [f" {w}" for w in words] + sorted(words)
  texts += ["What color is the shape?", "What shape is the object?", "What is in the image?",
            "What color is the shape in the first image?", "What color is the shape in the second image?"]
  for c in COLORS:
    for s in SHAPES:
      texts += [f"Is there a {c} {s}?", f"{c} {s}"]
  texts += ["How many shapes are there?", "How many shapes are there in the two images?", "Which image has more shapes?"]
  return texts


# ----------------------------------------------------------------------------- entry points

def ensure_demo_data(root: str, num_train: int = 4000, num_val: int = 200, num_test: int = 300,
                     seed: int = 0) -> dict:
  """Generates the demo set under `root` on first use (atomically: a temp dir renamed into place)
  and returns its paths: dir, train, validation, test (LLaVA JSON), image_folder, tokenizer_dir."""
  name = f"demo-v{VERSION}-n{num_train}-{num_val}-{num_test}-s{seed}"
  final = os.path.join(os.path.abspath(root), name)

  def paths(d):
    return {"dir": d, "train": os.path.join(d, "train.json"), "validation": os.path.join(d, "validation.json"),
            "test": os.path.join(d, "test.json"), "image_folder": d, "tokenizer_dir": os.path.join(d, "tokenizer")}

  if os.path.exists(os.path.join(final, "DONE")):
    return paths(final)
  os.makedirs(os.path.dirname(final), exist_ok=True)
  logging.getLogger(__name__).info("generating the demo data set (first use: %d + %d + %d pictures and their "
                                   "questions, a tokenizer) in %s", num_train, num_val, num_test, final)
  tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=os.path.dirname(final))
  try:
    rng = random.Random(seed)
    for split, n in (("train", num_train), ("validation", num_val), ("test", num_test)):
      img_dir = os.path.join(tmp, "images", split)
      os.makedirs(img_dir)
      recs = generate_split(rng, n, split, img_dir, f"images/{split}")
      with open(os.path.join(tmp, f"{split}.json"), "w") as f:
        json.dump(recs, f, indent=0)
    build_tokenizer(_corpus_texts(), os.path.join(tmp, "tokenizer"))
    with open(os.path.join(tmp, "DONE"), "w") as f:
      json.dump({"version": VERSION, "num_train": num_train, "num_val": num_val, "num_test": num_test,
                 "seed": seed}, f)
    try:
      os.rename(tmp, final)
    except OSError:  # another process finished first
      if not os.path.exists(os.path.join(final, "DONE")):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return paths(final)


# The longest demo sample has 101 tokens with 14 px patches (75 with 28 px); the training config check
# also wants room for the largest anyres_max_4 image (117 tokens with 14 px patches).
DEMO_SEQ_LEN = 128
DEMO_TILE_BUDGET = 2


def demo_data_config(paths: dict, split: str = "train"):
  """The pipeline.DataConfig for the demo (DEMO_SEQ_LEN, 2 tiles of 56 px per sample)."""
  return DataConfig(path=paths[split], image_folder=paths["image_folder"], seq_len=DEMO_SEQ_LEN,
                    buckets=(DEMO_SEQ_LEN,), tile_budget=DEMO_TILE_BUDGET)


def qa_items(json_path: str):
  """First question of each record for exact-match eval: dicts(id, images, question, answer),
  `question` without image tags (use template.inference_prompt_ids to add them back)."""
  with open(json_path) as f:
    recs = json.load(f)
  out = []
  for r in recs:
    imgs = r["image"] if isinstance(r["image"], list) else [r["image"]]
    q = r["conversations"][0]["value"].replace("<image>", "").strip()
    out.append({"id": r["id"], "images": imgs, "question": q, "answer": r["conversations"][1]["value"]})
  return out
