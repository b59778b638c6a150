"""A record's image / video paths stay inside image_folder / video_folder (`..`, absolute paths, symbolic links
out), through the training pipeline's per-record map: the record is skipped by name and the file outside is
never opened; data.allow_absolute_paths opens absolute paths and nothing else."""
import builtins
import json
import os

import pytest
from PIL import Image

from lladav_jax.data import pipeline
from lladav_jax.data.demo_data import demo_image_config, ensure_demo_data
from lladav_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = ensure_demo_data(str(tmp_path_factory.getbasetemp() / "demo"), num_train=48, num_val=8, num_test=8)
  return Tokenizer.from_dir(d["tokenizer_dir"])


@pytest.fixture
def tree(tmp_path):
  """root/images/in.png, root/videos/frames/*.png, and outside them root/secret/{x.png, frames/}, with links
  from inside the folders to the outside files."""
  img, vid, sec = tmp_path / "images", tmp_path / "videos", tmp_path / "secret"
  for d in (img, vid / "frames", sec / "frames"):
    d.mkdir(parents=True)
  for p in (img / "in.png", sec / "x.png", *(vid / "frames" / f"{i}.png" for i in range(3)),
            *(sec / "frames" / f"{i}.png" for i in range(3))):
    Image.new("RGB", (20, 10), (200, 0, 0)).save(p)
  (img / "link.png").symlink_to(sec / "x.png")
  (vid / "linked_frames").symlink_to(sec / "frames", target_is_directory=True)
  (vid / "mixed").mkdir()  # a frame folder with one frame linked out
  Image.new("RGB", (20, 10)).save(vid / "mixed" / "0.png")
  (vid / "mixed" / "1.png").symlink_to(sec / "x.png")
  return tmp_path


@pytest.fixture
def opened(monkeypatch):
  """Every path opened through builtins.open (records.Opener's only way to read a file), resolved."""
  paths, real_open = [], builtins.open

  def spy(file, *a, **kw):
    if isinstance(file, (str, bytes, os.PathLike)):
      paths.append(os.path.realpath(file))
    return real_open(file, *a, **kw)

  monkeypatch.setattr(builtins, "open", spy)
  return paths


def process(tok, folder, video_folder="", **kw):
  cfg = pipeline.DataConfig(path="x.json", image_folder=str(folder), video_folder=str(video_folder), seq_len=512,
                            tile_budget=16, **kw)
  proc = pipeline.SampleProcessor(tok, demo_image_config(), cfg)

  def run(**media):
    r = {"id": "r", "conversations": [{"from": "human", "value": "<image>\nWhat color?"},
                                      {"from": "gpt", "value": "red"}], **media}
    return proc(("k", json.dumps(r).encode()))
  return run


def test_paths_outside_the_folders_are_skipped_unopened(tok, tree, opened):
  secret = str(tree / "secret")
  run = process(tok, tree / "images", tree / "videos")
  for ref in ("../secret/x.png", str(tree / "secret" / "x.png"), "link.png", "../../../../../../etc/passwd"):
    out = run(image=ref)
    assert out.reason == "outside_image_folder" and ref in out.detail, (ref, out)
  assert "data.allow_absolute_paths=True" in run(image=str(tree / "secret" / "x.png")).detail
  for video in ("../secret/frames", "linked_frames", "mixed", ["frames/0.png", "../secret/frames/1.png"],
                str(tree / "secret" / "frames")):
    out = run(video=video)
    assert out.reason == "outside_video_folder", (video, out)
  # a record with one good and one escaping image opens neither
  out = run(image=["in.png", "../secret/x.png"], conversations=[
      {"from": "human", "value": "<image><image>\nSame?"}, {"from": "gpt", "value": "no"}])
  assert out.reason == "outside_image_folder", out
  assert not [p for p in opened if p.startswith(secret) or p == "/etc/passwd"], opened
  # the spy sees what the opener reads: inside the folders everything is opened and used
  assert isinstance(run(image="in.png"), pipeline.Sample) and isinstance(run(video="frames"), pipeline.Sample)
  assert str(tree / "images" / "in.png") in opened and str(tree / "videos" / "frames" / "2.png") in opened


def test_an_empty_image_folder_is_the_working_directory(tok, tree, opened, monkeypatch):
  # image_folder "" (the default): relative paths as given, but none leaves the working directory
  monkeypatch.chdir(tree / "images")
  run = process(tok, "")
  assert isinstance(run(image="in.png"), pipeline.Sample)
  for ref in ("../secret/x.png", "../../../../../../etc/passwd", "link.png"):
    assert run(image=ref).reason == "outside_image_folder", ref
  assert not [p for p in opened if p.startswith(str(tree / "secret")) or p == "/etc/passwd"], opened


def test_allow_absolute_paths_opens_absolute_paths_only(tok, tree, opened):
  run = process(tok, tree / "images", tree / "videos", allow_absolute_paths=True)
  assert isinstance(run(image=str(tree / "secret" / "x.png")), pipeline.Sample)
  assert isinstance(run(video=str(tree / "secret" / "frames")), pipeline.Sample)
  assert str(tree / "secret" / "x.png") in opened
  # relative paths are still held inside their folder
  assert run(image="../secret/x.png").reason == "outside_image_folder"
  assert run(image="link.png").reason == "outside_image_folder"
  assert run(video="linked_frames").reason == "outside_video_folder"


def test_allow_absolute_paths_is_a_validated_bool():
  assert pipeline.config_problems(pipeline.DataConfig(path="x.json", allow_absolute_paths=True)) == []
  (err,) = pipeline.config_problems(pipeline.DataConfig(path="x.json", allow_absolute_paths="yes"))
  assert "data.allow_absolute_paths='yes'" in err
  from configs.finetune import get_config
  assert get_config("demo,data.allow_absolute_paths=true").data.allow_absolute_paths is True
  with pytest.raises(ValueError, match="data.allow_absolute_paths"):
    get_config("demo,data.allow_absolute_paths=sometimes")
