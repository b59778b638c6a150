"""Readers on tiny files made here: VLMEvalKit TSV, MMMU JSONL, open-QA JSON, LLaVA rows; bad input."""
import csv
import json

import pytest
from PIL import Image

from lladav_jax.eval import readers as R
from lladav_jax.eval.tasks import get_task

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def b64_png(color, size=(8, 6)):
  return R.encode_image_base64(Image.new("RGB", size, color))


def write_tsv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t")
    w.writerow(header)
    w.writerows(rows)
  return str(path)


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]


def mmbench_rows():
  return [
      ["1", "What color is it?", "Look closely.", "red", "blue", "green", "", "A", "color", b64_png(RED)],
      ["2", "Which is larger?", "nan", "sun", "moon", "", "", "B", "size", b64_png(BLUE, (10, 4))],
      ["1000001", "What color is it?", "Look closely.", "blue", "red", "green", "", "B", "color", "1"],  # shares row 1's image
  ]


def test_tsv_mmbench(tmp_path):
  path = write_tsv(tmp_path / "mmb.tsv", MMB_HEADER, mmbench_rows())
  rr = R.read_samples(path, get_task("mmbench_en_dev"))
  assert rr.rows_read == 3 and not rr.skipped
  s0, s1, s2 = rr.samples
  assert s0.prompt_text == ("Look closely. What color is it? There are several options:\nA. red\nB. blue\nC. green\n"
                            "Answer with the option's letter from the given choices directly.")
  assert s1.prompt_text.startswith("Which is larger? There are several options:\nA. sun\nB. moon\nAnswer")  # 'nan' hint dropped
  assert s0.choices == ["red", "blue", "green"] and s0.answers == ["A"]
  assert s0.images[0].size == (8, 6) and s0.images[0].getpixel((0, 0)) == RED
  assert s1.images[0].size == (10, 4)
  assert s2.images[0].getpixel((0, 0)) == RED   # image referenced by index
  assert s2.meta["index"] == 1000001 and s0.meta["category"] == "color"
  assert s0.meta["pair_id"] == s2.meta["pair_id"]  # same picture -> same pair key (MME pairs)


def test_tsv_missing_column_names_file_and_column(tmp_path):
  header = [h for h in MMB_HEADER if h != "answer"]
  rows = [[c for h, c in zip(MMB_HEADER, r) if h != "answer"] for r in mmbench_rows()]
  path = write_tsv(tmp_path / "bad.tsv", header, rows)
  with pytest.raises(R.DataFormatError, match=r"bad\.tsv.*'answer'"):
    R.read_samples(path, get_task("mmbench_en_dev"))


def test_tsv_missing_value_names_row_and_column(tmp_path):
  rows = mmbench_rows()
  rows[1][1] = ""  # empty question in the 2nd row
  path = write_tsv(tmp_path / "hole.tsv", MMB_HEADER, rows)
  with pytest.raises(R.DataFormatError, match=r"row 2 \(index 2\).*'question'"):
    R.read_samples(path, get_task("mmbench_en_dev"))


def test_tsv_undecodable_image_is_skipped_and_reported(tmp_path):
  rows = mmbench_rows()
  rows[1][-1] = "QUJD" * 400  # valid base64, not an image
  path = write_tsv(tmp_path / "img.tsv", MMB_HEADER, rows)
  rr = R.read_samples(path, get_task("mmbench_en_dev"))
  assert [s.id for s in rr.samples] == ["1", "1000001"]
  assert len(rr.skipped) == 1 and rr.skipped[0]["id"] == "2" and rr.skipped[0]["row"] == 2
  assert rr.skipped[0]["reason"]
  assert rr.rows_read == 3


def test_tsv_limit_and_shards(tmp_path):
  path = write_tsv(tmp_path / "mmb.tsv", MMB_HEADER, mmbench_rows())
  task = get_task("mmbench_en_dev")
  assert [s.id for s in R.read_samples(path, task, limit=2).samples] == ["1", "2"]
  assert [s.id for s in R.read_samples(path, task, shard_index=0, shard_count=2).samples] == ["1", "1000001"]
  assert [s.id for s in R.read_samples(path, task, shard_index=1, shard_count=2).samples] == ["2"]


def test_tsv_mme_prompt_and_yes_no(tmp_path):
  header = ["index", "category", "image", "question", "answer"]
  img = b64_png(GREEN)
  rows = [["0", "existence", img, "Is there a dog? Please answer yes or no.", "Yes"],
          ["1", "existence", "0", "Is there a cat? Please answer yes or no.", "No"]]
  rr = R.read_samples(write_tsv(tmp_path / "mme.tsv", header, rows), get_task("mme"))
  assert rr.samples[0].prompt_text == "Is there a dog?\nAnswer the question using a single word or phrase."
  assert rr.samples[1].answers == ["No"]
  assert rr.samples[0].meta["pair_id"] == rr.samples[1].meta["pair_id"] == "0"


def test_jsonl_mmmu_options_string_and_image_tags(tmp_path):
  rows = [
      {"id": "validation_Art_1", "question": "Compare <image 2> with the style shown.",
       "options": "['Baroque', 'Cubism']", "answer": "B", "question_type": "multiple-choice",
       "image_1": b64_png(RED), "image_2": b64_png(BLUE)},
      {"id": "validation_Math_2", "question": "What is 2+3? <image 1>", "options": "[]", "answer": "5",
       "image_1": b64_png(GREEN)},
  ]
  rr = R.read_samples(write_jsonl(tmp_path / "mmmu.jsonl", rows), get_task("mmmu_val"))
  mc, op = rr.samples
  assert mc.prompt_text == ("Compare <image 2> with the style shown.\nA. Baroque\nB. Cubism\n\n"
                            "Answer with the option's letter from the given choices directly.")
  assert len(mc.images) == 1 and mc.images[0].getpixel((0, 0)) == BLUE  # only the tagged image
  assert mc.choices == ["Baroque", "Cubism"] and mc.answers == ["B"]
  assert op.meta["question_type"] == "open"
  assert op.prompt_text == "What is 2+3? <image 1>\n\nAnswer the question using a single word or phrase."


def test_jsonl_image_paths_relative_to_file(tmp_path):
  (tmp_path / "imgs").mkdir()
  Image.new("RGB", (5, 5), RED).save(tmp_path / "imgs" / "a.png")
  Image.new("RGB", (5, 5), BLUE).save(tmp_path / "imgs" / "b.png")
  rows = [{"id": "m1", "question": "Which differs? <image 2> <image 1>", "options": ["first", "second"],
           "answer": "A", "images": ["imgs/a.png", "imgs/b.png"]}]
  rr = R.read_samples(write_jsonl(tmp_path / "muir.jsonl", rows), get_task("muirbench"))
  assert [im.getpixel((0, 0)) for im in rr.samples[0].images] == [RED, BLUE]  # tag order 1, 2


def test_json_open_qa_with_missing_image_file(tmp_path):
  Image.new("RGB", (5, 5), RED).save(tmp_path / "doc.png")
  data = {"data": [
      {"questionId": 7, "question": "What is the title?", "answers": ["Annual Report", "annual report 2020"],
       "image": "doc.png"},
      {"questionId": 8, "question": "What is the date?", "answers": ["1 May"], "image": "missing.png"},
  ]}
  (tmp_path / "docvqa.json").write_text(json.dumps(data))
  rr = R.read_samples(str(tmp_path / "docvqa.json"), get_task("docvqa_val"))
  assert [s.id for s in rr.samples] == ["7"]
  assert rr.samples[0].answers == ["Annual Report", "annual report 2020"]
  assert rr.samples[0].prompt_text == "What is the title?\nAnswer the question using a single word or phrase."
  assert rr.skipped[0]["id"] == "8" and "missing.png" in rr.skipped[0]["reason"]


def test_jsonl_missing_field_names_line_and_field(tmp_path):
  rows = [{"id": "a", "question": "q?", "answer": "1", "image": b64_png(RED)},
          {"id": "b", "answer": "2", "image": b64_png(RED)}]
  with pytest.raises(R.DataFormatError, match=r"line 2 \(id b\).*'question'"):
    R.read_samples(write_jsonl(tmp_path / "c.jsonl", rows), get_task("chartqa"))


def test_jsonl_bad_options_is_a_format_error(tmp_path):
  rows = [{"id": "x", "question": "q", "options": "['a', ", "answer": "A", "image_1": b64_png(RED)}]
  with pytest.raises(R.DataFormatError, match="options"):
    R.read_samples(write_jsonl(tmp_path / "m.jsonl", rows), get_task("mmmu_val"))


def test_ai2d_answer_index_becomes_letter(tmp_path):
  rows = [{"id": 1, "question": "Which stage?", "options": ["egg", "larva", "adult"], "answer": "2",
           "image": b64_png(RED)}]
  s = R.read_samples(write_jsonl(tmp_path / "ai2d.jsonl", rows), get_task("ai2d")).samples[0]
  assert s.answers == ["C"]
  assert s.prompt_text == ("Which stage?\nA. egg\nB. larva\nC. adult\n"
                           "Answer with the option's letter from the given choices directly.")


def test_llava_conversation_rows_for_demo(tmp_path):
  Image.new("RGB", (5, 5), RED).save(tmp_path / "r.png")
  rows = [{"id": "d0", "image": "r.png", "conversations": [
      {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]}]
  s = R.read_samples(write_jsonl(tmp_path / "demo.jsonl", rows), get_task("demo")).samples[0]
  assert s.prompt_text == "What color is it?" and s.answers == ["red"]
  assert s.images[0].getpixel((0, 0)) == RED


def test_a_llava_split_with_its_image_folder_as_training_reads_it(tmp_path):
  """A user's own LLaVA-format split, image paths relative to a separate image folder (data.image_folder):
  read under --image_folder; relative to the file, the same rows are skipped naming the file."""
  (tmp_path / "images" / "test").mkdir(parents=True)
  Image.new("RGB", (5, 5), BLUE).save(tmp_path / "images" / "test" / "b.png")
  (tmp_path / "splits").mkdir()
  rows = [{"id": "u0", "image": "test/b.png", "conversations": [
      {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "blue"}]}]
  split = write_jsonl(tmp_path / "splits" / "test.jsonl", rows)
  for task in ("llava_exact_match", "llava_anls"):
    rr = R.read_samples(split, get_task(task), image_folder=str(tmp_path / "images"))
    assert [s.images[0].getpixel((0, 0)) for s in rr.samples] == [BLUE] and rr.samples[0].answers == ["blue"]
  rr = R.read_samples(split, get_task("llava_exact_match"))
  assert not rr.samples and "b.png" in rr.skipped[0]["reason"]
  with pytest.raises(FileNotFoundError, match="image folder"):
    R.read_samples(split, get_task("llava_exact_match"), image_folder=str(tmp_path / "nope"))


def test_mathvista_prompt_from_fields(tmp_path):
  rows = [{"pid": "1", "question": "How many cubes?", "answer": "3", "question_type": "free_form",
           "answer_type": "integer", "precision": None, "image": b64_png(RED)},
          {"pid": "2", "question": "Which is longest?", "choices": ["a", "b"], "answer": "b",
           "question_type": "multi_choice", "answer_type": "text", "unit": "", "image": b64_png(RED)}]
  s1, s2 = R.read_samples(write_jsonl(tmp_path / "mv.jsonl", rows), get_task("mathvista_testmini")).samples
  assert s1.prompt_text == "How many cubes?\nAnswer the question using a single integer number."
  assert s2.prompt_text == ("Which is longest?\nA. a\nB. b\n"
                            "Answer with the option's letter from the given choices directly.")


def test_unknown_extension_and_missing_file(tmp_path):
  (tmp_path / "x.parquet").write_text("")
  with pytest.raises(R.DataFormatError, match="unknown data format"):
    R.read_samples(str(tmp_path / "x.parquet"), get_task("chartqa"))
  with pytest.raises(FileNotFoundError):
    R.read_samples(str(tmp_path / "nope.jsonl"), get_task("chartqa"))
