"""Image tensors of the pipeline: anyres tiles against transformers, modes, videos, budgets."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from lladav_jax import multimodal
from lladav_jax.config import IMAGE_TOKEN_INDEX as IMG, VisionConfig
from lladav_jax.data import pipeline
from lladav_jax.data.demo_data import ensure_demo_data
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.model.vision import normalize_pixels

S = 56


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = ensure_demo_data(str(tmp_path_factory.getbasetemp() / "demo"), num_train=48, num_val=8, num_test=8)
  return Tokenizer.from_dir(d["tokenizer_dir"])


# 56 px tiles of 14 px patches, anyres (the default aspect): the released model's image path at a tenth of the size.
ANYRES = multimodal.ImageConfig(image_size=56, patch_size=14)


def processor(tok, folder, image_cfg=None, **kw):
  """The training pipeline's per-record map (ANYRES unless `image_cfg`); `kw` sets data fields."""
  cfg = pipeline.DataConfig(path="x.json", image_folder=str(folder), seq_len=512, tile_budget=16).replace(**kw)
  return pipeline.SampleProcessor(tok, image_cfg or ANYRES, cfg)


def rec(image=None, video=None, q="<image>\nWhat color is the circle?"):
  r = {"id": "r", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "red"}]}
  if image is not None:
    r["image"] = image
  if video is not None:
    r["video"] = video
  return ("k", json.dumps(r).encode())


def test_anyres_tiles_match_transformers(tok, tmp_path):
  """Tiles for several aspect ratios == LlavaOnevisionImageProcessor (best resolution, black pad,
  base image, 0.5/0.5 normalisation) with the same grid pinpoints, computed independently."""
  transformers = pytest.importorskip("transformers")
  cls = getattr(transformers, "LlavaOnevisionImageProcessorPil", None) or transformers.LlavaOnevisionImageProcessor
  hf = cls(size={"height": S, "width": S}, image_grid_pinpoints=[[S * i, S * j] for i in range(1, 7) for j in range(1, 7)],
           image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True, do_convert_rgb=True)
  rng = np.random.default_rng(0)
  proc = processor(tok, tmp_path)
  for w, h in [(56, 56), (100, 40), (40, 130), (150, 110), (300, 57)]:
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    img.save(tmp_path / f"{w}x{h}.png")
    out = proc(rec(f"{w}x{h}.png"))
    assert isinstance(out, pipeline.Sample), out
    ref = hf(img, return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)
    n = out.expanded.pixels.shape[0]
    assert n == ref.shape[0] or np.all(ref[n:] == 0), (w, h)
    pixels = np.asarray(normalize_pixels(out.expanded.pixels, VisionConfig()))  # as the model normalises them
    np.testing.assert_allclose(pixels, ref[:n], atol=1e-6, err_msg=f"{w}x{h}")
    # token count of the spliced image: base + unpadded grid with row newlines (LLaVA-NeXT's formula)
    assert (out.expanded.tokens == IMG).sum() == reference_token_count(w, h, ANYRES), (w, h)


def reference_token_count(w, h, cfg):
  """LLaVA-OneVision's anyres_max_N image token count, transcribed: base tile, the best grid unpadded to
  the original aspect (`unpad_image`), bilinearly shrunk past N tiles x 1.1, a newline per row."""
  from transformers.image_processing_utils import select_best_resolution
  s, g = cfg.image_size, cfg.grid
  gh, gw = select_best_resolution((h, w), [(s * j, s * i) for i, j in cfg.grid_pinpoints])
  ch, cw = gh // s * g, gw // s * g
  if w / h > cw / ch:
    nh = int(round(h * (cw / w), 7))
    ch -= 2 * ((ch - nh) // 2)
  else:
    nw = int(round(w * (ch / h), 7))
    cw -= 2 * ((cw - nw) // 2)
  limit = cfg.max_area_tiles
  if ch * cw > limit * g * g * 1.1:
    times = math.sqrt(ch * cw / (limit * g * g))
    ch, cw = int(ch // times), int(cw // times)
  return g * g + ch * (cw + 1)


def test_modes_are_converted_not_skipped(tok, tmp_path):
  base = np.zeros((40, 60, 3), np.uint8)
  base[:, :20] = (255, 0, 0)
  base[:, 20:40] = (0, 255, 0)
  base[:, 40:] = (0, 0, 255)
  rgb = Image.fromarray(base)
  rgb.convert("P", palette=Image.ADAPTIVE, colors=4).save(tmp_path / "palette.png")
  p = rgb.convert("P", palette=Image.ADAPTIVE, colors=4)
  p.info["transparency"] = 0
  p.save(tmp_path / "palette_t.png", transparency=0)
  rgba = rgb.copy()
  rgba.putalpha(128)
  rgba.save(tmp_path / "rgba.png")
  rgb.convert("CMYK").save(tmp_path / "cmyk.tiff")
  Image.fromarray((np.full((40, 60), 65535, np.uint16))).save(tmp_path / "white16.png")
  Image.fromarray((np.full((40, 60), 257 * 128, np.uint16))).save(tmp_path / "gray16.png")
  proc = processor(tok, tmp_path)
  expect = multimodal.process_image(rgb, ANYRES).tiles
  for name in ("palette.png", "rgba.png", "cmyk.tiff"):
    out = proc(rec(name))
    assert isinstance(out, pipeline.Sample), (name, out)
    np.testing.assert_allclose(out.expanded.pixels, expect, atol=1e-6, err_msg=name)
  out = proc(rec("palette_t.png"))
  assert isinstance(out, pipeline.Sample)
  assert Image.open(tmp_path / "white16.png").mode.startswith("I")
  for name, v in (("white16.png", 255), ("gray16.png", 128)):  # 16-bit scaled to 8 bits, not clipped
    ref = multimodal.process_image(Image.new("RGB", (60, 40), (v, v, v)), ANYRES).tiles
    np.testing.assert_allclose(proc(rec(name)).expanded.pixels, ref, atol=1e-6, err_msg=name)


def test_multi_image_pad_text_only_and_budget(tok, tmp_path):
  Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "a.png")
  Image.new("RGB", (30, 60), (0, 0, 255)).save(tmp_path / "b.png")
  proc = processor(tok, tmp_path)
  out = proc(rec(["a.png", "b.png"], q="<image> <image>\nWhich image has more shapes?"))
  assert out.expanded.pixels.shape == (2, S, S, 3)  # "pad" path: one tile each
  assert (out.expanded.tokens == IMG).sum() == 2 * (16 + 1)  # 16 + 1 newline each
  pad = multimodal.expand2square(Image.open(tmp_path / "a.png"), (127, 127, 127))
  np.testing.assert_array_equal(out.expanded.pixels[0], multimodal.tile(pad, ANYRES))
  # text only: no tiles at all, merge plan all "zero" rows
  t = proc(("k", json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                              {"from": "gpt", "value": "yes"}]}).encode()))
  # (the sample's own table: no tiles, then the newline row 0 and the zero row 1; collate re-packs it)
  assert t.expanded.pixels.shape[0] == 0 and (t.expanded.merge_w == 0).all() and (t.expanded.merge_idx == 1).all()
  # budget: a 300x57 image needs more than 4 tiles
  Image.new("RGB", (300, 57)).save(tmp_path / "wide.png")
  small = processor(tok, tmp_path, tile_budget=4)
  assert small(rec("wide.png")).reason == "too_many_tiles"


def test_video_gif_and_frame_list(tok, tmp_path):
  frames = [Image.new("RGB", (56, 56), (i * 20, 0, 0)) for i in range(10)]
  frames[0].save(tmp_path / "v.gif", save_all=True, append_images=frames[1:], duration=1000, loop=0)
  for i, f in enumerate(frames):
    f.save(tmp_path / f"f{i}.png")
  proc = processor(tok, tmp_path, frames_upbound=4, tile_budget=8)
  g = proc(rec(video="v.gif"))
  assert isinstance(g, pipeline.Sample), g
  assert g.expanded.pixels.shape[0] == 4  # 10 frames at 1 fps -> 10 > 4 -> linspace(0, 9, 4) = 0, 3, 6, 9
  reds = g.expanded.pixels[:, 0, 0, 0].astype(int)
  np.testing.assert_array_equal(reds, [0, 60, 120, 180])
  assert (g.expanded.tokens == IMG).sum() == 4 * 2 * 3  # 4x4 grid pooled to 2x2, + a newline per row
  # a list of frame files is sampled as a frame folder: with force_sample, frames_upbound of them
  lst = processor(tok, tmp_path, frames_upbound=4, force_sample=True, tile_budget=8)(
      rec(video=[f"f{i}.png" for i in range(10)]))
  np.testing.assert_allclose(lst.expanded.pixels, g.expanded.pixels, atol=1e-6)
  mp4 = tmp_path / "v.mp4"
  mp4.write_bytes(b"\x00\x00\x00\x18ftypmp42")
  out = proc(rec(video="v.mp4"))
  assert out.reason == "corrupt_video" and "v.mp4" in out.detail


def _frame_folder(path, n, corrupt=()):
  """n frame files f000.png... whose red channel encodes the index (`corrupt`: indices written as junk)."""
  path.mkdir(parents=True)
  for i in range(n):
    if i in corrupt:
      (path / f"f{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n junk")
    else:
      Image.new("RGB", (16, 12), (i * 10, 0, 0)).save(path / f"f{i:03d}.png")
  return path


def _frame_indices(frames):
  return [f.getpixel((0, 0))[0] // 10 for f in frames]


def test_frame_folders_are_sampled_as_the_original(tmp_path):
  # train.py's ShareGPTVideo branch: the folder's files sorted by name, linspace(0, n - 1, 10) (frames_upbound
  # with force_sample), each opened and converted to RGB; a frame that fails to open is left out
  from lladav_jax.data import records
  root = tmp_path / "videos"
  _frame_folder(root / "ShareGPTVideo" / "long", 25)
  _frame_folder(root / "ShareGPTVideo" / "short", 5)
  _frame_folder(root / "ShareGPTVideo" / "broken", 12, corrupt=(0, 6))
  opener = records.Opener({}, str(tmp_path / "images"), str(root))
  load = lambda ref, **kw: records.load_video_frames(opener, ref, video_fps=1.0, max_pixels=10 ** 8,
                                                     **{"frames_upbound": 32, **kw})
  assert _frame_indices(load("ShareGPTVideo/long")) == [0, 2, 5, 8, 10, 13, 16, 18, 21, 24]
  assert _frame_indices(load("ShareGPTVideo/short")) == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4]
  assert _frame_indices(load("ShareGPTVideo/long", frames_upbound=4, force_sample=True)) == [0, 8, 16, 24]
  # linspace(0, 11, 10) = 0 1 2 3 4 6 7 8 9 11: frames 0 and 6 are junk
  assert _frame_indices(load("ShareGPTVideo/broken")) == [1, 2, 3, 4, 7, 8, 9, 11]
  with pytest.raises(records.Skip, match="outside_video_folder"):
    load("../images/../../x")
  (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
  _frame_folder(tmp_path / "elsewhere", 3)
  with pytest.raises(records.Skip, match="outside_video_folder"):
    load("link")
