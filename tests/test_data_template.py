"""Tokenizer and chat template: labels token for token as the original's preprocess_llada."""
import json
import os

import pytest

from lladav_jax.config import IGNORE_INDEX as IG, IMAGE_TOKEN_INDEX as IMG
from lladav_jax.data import template
from lladav_jax.data.demo_data import ensure_demo_data
from lladav_jax.data.template import LabelConfig
from lladav_jax.data.tokenizer import Tokenizer

SYS = "You are a helpful assistant."


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return ensure_demo_data(str(tmp_path_factory.getbasetemp() / "demo"), num_train=48, num_val=8, num_test=8)


@pytest.fixture(scope="module")
def tok(demo):
  return Tokenizer.from_dir(demo["tokenizer_dir"])


def ids_of(tok, pieces):
  """Hand-written token strings -> ids (ints pass through)."""
  out = []
  for p in pieces:
    if isinstance(p, int):
      out.append(p)
    else:
      i = tok.token_to_id(p)
      assert i is not None, p
      out.append(i)
  return out


def test_special_ids_by_name(tok):
  assert tok.bos_id == tok.token_to_id("<|startoftext|>")
  assert tok.eos_id == tok.pad_id == tok.token_to_id("<|endoftext|>")
  assert tok.mask_id == tok.token_to_id("<|mdm_mask|>")
  assert tok.eot_id == tok.token_to_id("<|eot_id|>")
  assert tok.start_header_id == tok.token_to_id("<|start_header_id|>")
  assert tok.end_header_id == tok.token_to_id("<|end_header_id|>")
  assert tok.vocab_size < 512 and tok.mask_id < tok.vocab_size
  assert len({tok.bos_id, tok.eos_id, tok.mask_id, tok.eot_id, tok.start_header_id, tok.end_header_id}) == 6


def test_encode_decode_image_and_stops(tok):
  ids = tok.encode("<image>\nWhat color is the circle?")
  assert ids[0] == IMG and ids[1] == tok.token_to_id("\n")
  assert tok.bos_id not in ids and tok.eos_id not in ids  # nothing added
  assert tok.decode(ids) == "<image>\nWhat color is the circle?"
  assert tok.decode([tok.bos_id] + ids, skip_special=True) == "\nWhat color is the circle?"
  assert tok.decode(ids + [-100, 10**6]) == tok.decode(ids)  # labels' -100, ids past the vocabulary
  assert tok.encode_stop_strings(["<|eot_id|>", "\n"]) == [[tok.eot_id], [tok.token_to_id("\n")]]


def test_missing_special_token_names_file_and_token(demo, tmp_path):
  src = demo["tokenizer_dir"]
  with open(os.path.join(src, "tokenizer.json")) as f:
    tj = json.load(f)
  tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<|mdm_mask|>"]
  tj["model"]["vocab"].pop("<|mdm_mask|>")
  with open(tmp_path / "tokenizer.json", "w") as f:
    json.dump(tj, f)
  with pytest.raises(ValueError, match=r"<\|mdm_mask\|>.*tokenizer\.json"):
    Tokenizer.from_dir(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    Tokenizer.from_dir(str(tmp_path / "nope"))


def _header(role):
  return ["<|start_header_id|>", role, "<|end_header_id|>", "\n\n"]


def test_single_turn_labels_by_hand(tok):
  msgs = [("human", "<image>\nWhat color is the circle?"), ("gpt", "red")]
  ids, labels = template.render_training(tok, msgs, LabelConfig(system_message=SYS))
  sys_part = ["<|startoftext|>"] + _header("system") + ["You", " are", " a", " helpful", " assistant", ".", "<|eot_id|>"]
  user = _header("user") + [IMG, "\n", "What", " color", " is", " the", " circle", "?", "<|eot_id|>"]
  asst = _header("assistant") + ["red", "<|eot_id|>"]
  assert ids == ids_of(tok, sys_part + user + asst)
  # bos / header / eot / "\n\n" (a vocabulary entry here) labelled everywhere; the assistant message whole.
  exp_sys = ["<|startoftext|>", "<|start_header_id|>", IG, "<|end_header_id|>", "\n\n"] + [IG] * 6 + ["<|eot_id|>"]
  exp_user = ["<|start_header_id|>", IG, "<|end_header_id|>", "\n\n"] + [IG] * 8 + ["<|eot_id|>"]
  assert labels == ids_of(tok, exp_sys + exp_user + asst)
  # The original's byte-level BPE has no "\n\n" vocabulary entry: then it stays unlabelled in prompts.
  _, lab2 = template.render_training(tok, msgs, LabelConfig(system_message=SYS, unmask_tokens=(
      "<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")))
  nn = tok.token_to_id("\n\n")
  assert [i for i, (a, b) in enumerate(zip(labels, lab2)) if a != b] == [4, 15]
  assert lab2[4] == IG and lab2[15] == IG and lab2[-3] == nn  # assistant's own "\n\n" still labelled


def test_multi_turn_and_multi_image_by_hand(tok):
  msgs = [("human", "<image> <image>\nWhich image has more shapes?"), ("gpt", "first"),
          ("human", "How many shapes are there?"), ("gpt", "two")]
  ids, labels = template.render_training(tok, msgs, LabelConfig(system_message=SYS))
  sys_part = ["<|startoftext|>"] + _header("system") + ["You", " are", " a", " helpful", " assistant", ".", "<|eot_id|>"]
  u1 = _header("user") + [IMG, " ", IMG, "\n", "Which", " image", " has", " more", " shapes", "?", "<|eot_id|>"]
  a1 = _header("assistant") + ["first", "<|eot_id|>"]
  u2 = _header("user") + ["How", " many", " shapes", " are", " there", "?", "<|eot_id|>"]
  a2 = _header("assistant") + ["two", "<|eot_id|>"]
  assert ids == ids_of(tok, sys_part + u1 + a1 + u2 + a2)
  struct = {"<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n\n"}
  exp = [p if (isinstance(p, str) and p in struct) else IG for p in sys_part + u1]
  exp += a1 + [p if (isinstance(p, str) and p in struct) else IG for p in u2] + a2
  assert labels == ids_of(tok, exp)
  assert sum(1 for t in ids if t == IMG) == 2


def test_switches(tok):
  msgs = [("gpt", "Hello."), ("human", "<image>\nIs there a red circle?"), ("gpt", "yes")]
  ids, labels = template.render_training(tok, msgs, LabelConfig(system_message=SYS))
  hdr_text = "<|start_header_id|>assistant<|end_header_id|>"
  assert tok.decode(ids).count(hdr_text) == 1  # the leading gpt turn is dropped, as the original
  ids_k, _ = template.render_training(tok, msgs, LabelConfig(system_message=SYS, drop_leading_non_user=False))
  assert tok.decode(ids_k).count(hdr_text) == 2
  _, lab_nohead = template.render_training(tok, msgs, LabelConfig(system_message=SYS, label_assistant_header=False))
  hdr = ids_of(tok, ["assistant"])[0]
  k = len(ids) - 1 - ids[::-1].index(hdr)  # the assistant role token
  assert labels[k] == hdr and lab_nohead[k] == IG
  assert lab_nohead[-2:] == labels[-2:]  # content and eot stay labelled


def test_image_tag_normalisation():
  cfg = LabelConfig()
  out = template.normalize_image_tags([("human", "What is this? <image>"), ("human", "<image> a <image> b"),
                                       ("gpt", "QA_GT_caption_based_noisy ok")], cfg)
  assert out[0] == ("human", "<image>\nWhat is this?")
  assert out[1] == ("human", "<image> a <image> b")  # two tags: left alone
  assert out[2] == ("gpt", " ok")


def test_plain_labels_by_hand(tok):
  ids, labels = template.render_plain(tok, [("human", "describe <image>"), ("gpt", "red circle")])
  assert ids == ids_of(tok, [IMG, "red", " circle", "\n"])
  assert labels == ids_of(tok, [IG, "red", " circle", "\n"])
  with pytest.raises(ValueError):
    template.render_plain(tok, [("human", "no image"), ("gpt", "x")])


def test_inference_prompt(tok):
  ids = template.inference_prompt_ids(tok, "How many shapes are there?  ", 2, system=SYS)
  exp = ["<|startoftext|>"] + _header("system") + ["You", " are", " a", " helpful", " assistant", ".", "<|eot_id|>"]
  exp += _header("user") + [IMG, " ", IMG, "\n", "How", " many", " shapes", " are", " there", "?", "<|eot_id|>"]
  exp += _header("assistant")
  assert ids == ids_of(tok, exp)  # lmms-eval's "<image> <image>\n" + question; content trimmed
  one = template.inference_prompt_ids(tok, "What color is the circle?", 1)
  assert tok.decode(one).endswith("<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat color is the circle?"
                                  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
  assert template.DEFAULT_SYSTEM in tok.decode(one)


def test_against_the_original_algorithm_with_hf(demo, tok):
  """preprocess_llada re-run with a transformers tokenizer (apply_chat_template, added <image>
  token, convert_tokens_to_ids unmasking) on every demo record, and the HF inference template."""
  transformers = pytest.importorskip("transformers")
  hf = transformers.PreTrainedTokenizerFast.from_pretrained(demo["tokenizer_dir"])
  hf.add_tokens(["<image>"], special_tokens=True)
  image_id = hf.convert_tokens_to_ids("<image>")
  unmask = [hf.convert_tokens_to_ids(t) for t in ["<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>",
                                                  "<|eot_id|>", "\n\n"]]
  train_tpl = ("{% for message in messages %}{{'<|startoftext|>' + '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>' + '\n\n' + message['content'] + '<|eot_id|>'}}{% endfor %}")

  def apply(conv):
    text = hf.apply_chat_template(conv, chat_template=train_tpl, tokenize=False)
    return hf(text, add_special_tokens=False).input_ids

  with open(demo["train"]) as f:
    recs = json.load(f)
  for rec in recs:
    roles = {"human": "user", "gpt": "assistant"}
    src = rec["conversations"]
    input_id = apply([{"role": "system", "content": template.DEFAULT_SYSTEM}])
    target = [IG] * len(input_id)
    for c in src:
      role = roles.get(c["from"], c["from"])
      e = apply([{"role": role, "content": c["value"]}])[1:]
      input_id += e
      target += [IG] * len(e) if role in ("user", "system") else e
    for i, t in enumerate(input_id):
      if t in unmask:
        target[i] = t
      if t == image_id:
        input_id[i] = IMG
        target[i] = IG  # becomes IGNORE when the image is spliced in
    msgs = template.normalize_image_tags([(c["from"], c["value"]) for c in src])
    ids, labels = template.render_training(tok, msgs)
    assert ids == input_id, rec["id"]
    assert labels == target, rec["id"]
  # inference: the released HF chat template (written into the demo tokenizer_config.json)
  q = template.question_with_images("What color is the circle? ", 1)
  text = hf.apply_chat_template([{"role": "system", "content": template.DEFAULT_SYSTEM}, {"role": "user", "content": q}],
                                tokenize=False, add_generation_prompt=True)
  ref = [IMG if t == image_id else t for t in hf(text, add_special_tokens=False).input_ids]
  assert template.inference_prompt_ids(tok, "What color is the circle? ", 1) == ref


def test_vocabulary_is_the_largest_id_plus_one(tmp_path):
  """The released specials sit at 126080-126348 over a few hundred words: the model needs 126349 rows,
  not the entry count; a model with fewer rows is refused with both numbers."""
  from lladav_jax import config
  from lladav_jax.api import _check_vocab
  from tests.released import SPECIAL_IDS, demo_data_vocab
  demo_data_vocab(str(tmp_path))
  t = Tokenizer.from_dir(str(tmp_path))
  assert t.vocab_size == max(SPECIAL_IDS.values()) + 1 == 126349 and t.mask_id == 126336
  with pytest.raises(ValueError, match="largest id is 126348 but the model has vocab_size=512"):
    _check_vocab(config.tiny(vocab_size=512), t)
  _check_vocab(config.tiny(vocab_size=126464), t)
