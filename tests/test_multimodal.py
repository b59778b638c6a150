"""Host-side image processing and merge plans against the original's formulas (docs/ORIGINAL.md, "Images")
and torch's interpolate."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lladav_jax import multimodal as mm
from lladav_jax.config import IMAGE_TOKEN_INDEX

CFG = mm.ImageConfig()


def apply_plan(table, idx, w):
  """Reference semantics of the device-side gather: sum_k w_k * table[idx_k]."""
  return np.einsum("nkd,nk->nd", table[idx], w)


@pytest.mark.parametrize("size,tokens", [((1000, 1000), 3699), ((300, 300), 1485), ((384, 384), 1485)])
def test_anyres_token_counts_match_reference(size, tokens):
  assert mm.process_image(Image.new("RGB", size), CFG).num_tokens == tokens


def test_select_best_resolution():
  cands = [(i * 384, j * 384) for i, j in CFG.grid_pinpoints]
  assert mm.select_best_resolution((1000, 1000), cands) == (1152, 1152)
  assert mm.select_best_resolution((300, 300), cands) == (384, 384)
  # wide image: width gets more tiles
  w, h = mm.select_best_resolution((2000, 500), cands)
  assert w > h


def test_multi_image_flat_and_video_counts():
  ims = [Image.new("RGB", (200, 100)), Image.new("RGB", (50, 80))]
  assert [x.num_tokens for x in mm.process_sample_images(ims, CFG)] == [730, 730]
  flat = mm.ImageConfig(multi_image="pad_flat")  # the original's lmms-eval: padded square, 729, no newline
  xs = mm.process_sample_images(ims, flat)
  assert [x.num_tokens for x in xs] == [729, 729]
  side = Image.new("RGB", (200, 200), (127, 127, 127))
  side.paste(ims[0], (0, 50))  # expand2square centres the short side on the processor's mean (127)
  np.testing.assert_array_equal(xs[0].tiles[0], np.asarray(side.resize((384, 384), Image.BICUBIC)))
  frames = [Image.new("RGB", (64, 48))] * 32
  assert mm.process_video(frames, CFG).num_tokens == 32 * 14 * 15
  assert mm.process_video(frames, mm.ImageConfig(video_newline="one_token")).num_tokens == 32 * 196 + 1
  assert mm.process_video(frames, mm.ImageConfig(video_newline="frame")).num_tokens == 32 * 197


@pytest.mark.parametrize("hw,out", [((81, 81), (54, 54)), ((27, 27), (14, 14)), ((61, 108), (40, 72)),
                                     ((5, 7), (3, 2))])
def test_resize_plan_equals_torch_bilinear(hw, out):
  rng = np.random.default_rng(0)
  table = rng.standard_normal((hw[0] * hw[1], 8)).astype(np.float32)
  idx, w = mm.resize_plan(np.arange(hw[0] * hw[1]).reshape(hw), out)
  ours = apply_plan(table, idx.reshape(-1, 4), w.reshape(-1, 4))
  x = torch.from_numpy(table.T.reshape(1, 8, *hw))
  ref = F.interpolate(x, size=list(out), mode="bilinear", align_corners=False)[0]
  np.testing.assert_allclose(ours, ref.reshape(8, -1).T.numpy(), atol=1e-5)


def reference_anyres_merge(tile_feats, orig_size, cols, rows, newline, max_tiles=4):
  """The reference's spatial_unpad merge in torch (docs/ORIGINAL.md, "Images"), written independently."""
  g = int(math.isqrt(tile_feats.shape[1]))
  base, grid = tile_feats[0], tile_feats[1:]
  c = grid.shape[-1]
  f = torch.from_numpy(grid).view(rows, cols, g, g, c).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
  ow, oh = orig_size
  ch, cw = f.shape[1:]
  if ow / oh > cw / ch:
    nh = int(oh * (cw / ow)); pad = (ch - nh) // 2; f = f[:, pad:ch - pad, :]
  else:
    nw = int(ow * (ch / oh)); pad = (cw - nw) // 2; f = f[:, :, pad:cw - pad]
  _, h, w = f.shape
  times = math.sqrt(h * w / (max_tiles * g * g))
  if times > 1.1:
    f = F.interpolate(f[None], [int(h // times), int(w // times)], mode="bilinear")[0]
  nl = torch.from_numpy(newline)[:, None, None].expand(*f.shape[:-1], 1)
  f = torch.cat([f, nl], -1).flatten(1, 2).transpose(0, 1)
  return torch.cat([torch.from_numpy(base), f]).numpy()


@pytest.mark.parametrize("size", [(1000, 1000), (2000, 1500), (500, 1400), (1920, 1080), (300, 200), (390, 1200)])
def test_anyres_plan_equals_reference_merge(size):
  x = mm.process_image(Image.new("RGB", size), CFG)
  cands = [(i * 384, j * 384) for i, j in CFG.grid_pinpoints]
  bw, bh = mm.select_best_resolution(size, cands)
  assert x.num_tiles == 1 + (bw // 384) * (bh // 384)
  rng = np.random.default_rng(1)
  d = 4
  feats = rng.standard_normal((x.num_tiles, 729, d)).astype(np.float32)
  newline = rng.standard_normal(d).astype(np.float32)
  table = np.concatenate([feats.reshape(-1, d), newline[None], np.zeros((1, d), np.float32)])
  idx = np.where(x.plan_idx == mm.NEWLINE, len(table) - 2, np.where(x.plan_idx == mm.ZERO, len(table) - 1, x.plan_idx))
  ours = apply_plan(table, idx, x.plan_w)
  ref = reference_anyres_merge(feats, size, bw // 384, bh // 384, newline)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_anyres_tiles_are_padded_canvas_crops():
  img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (500, 900, 3), np.uint8))
  x = mm.process_image(img, CFG)
  cands = [(i * 384, j * 384) for i, j in CFG.grid_pinpoints]
  bw, bh = mm.select_best_resolution(img.size, cands)
  canvas = mm.resize_and_pad(img, (bw, bh))
  assert x.num_tiles == 1 + (bw // 384) * (bh // 384)
  assert x.tiles.dtype == np.uint8  # normalised on device
  np.testing.assert_array_equal(x.tiles[0], np.asarray(img.resize((384, 384), Image.BICUBIC)))
  last = canvas.crop((bw - 384, bh - 384, bw, bh))
  np.testing.assert_array_equal(x.tiles[-1], np.asarray(last))


def test_to_rgb_handles_modes():
  assert mm.to_rgb(Image.new("I;16", (4, 4), 65535)).getpixel((0, 0)) == (255, 255, 255)
  assert mm.to_rgb(Image.new("CMYK", (4, 4))).mode == "RGB"
  assert mm.to_rgb(Image.new("P", (4, 4))).mode == "RGB"
  assert mm.to_rgb(Image.new("RGBA", (4, 4), (1, 2, 3, 0))).getpixel((0, 0)) == (1, 2, 3)


def test_a_list_of_frames_is_one_video_placeholder():
  # lmms-eval video tasks pass a video as one visual that is a list of frames
  frames = [Image.new("RGB", (64, 48), (10 * k, 0, 0)) for k in range(4)]
  (vid,) = mm.process_sample_images([frames], CFG)
  ref = mm.process_video(frames, CFG)
  assert vid.num_tokens == ref.num_tokens == 4 * 14 * 15
  np.testing.assert_array_equal(vid.tiles, ref.tiles)
  e = mm.expand([7, IMAGE_TOKEN_INDEX, 8], [vid], CFG, tile_budget=4)
  assert len(e.tokens) == 2 + 4 * 14 * 15 and e.pixels.shape[0] == 4


def test_expand_builds_plan_and_checks_counts():
  ims = mm.process_sample_images([Image.new("RGB", (100, 50)), Image.new("RGB", (60, 60))], CFG)
  ids = [7, IMAGE_TOKEN_INDEX, 8, IMAGE_TOKEN_INDEX, 9]
  e = mm.expand(ids, ims, CFG, labels=[-100, -100, 8, -100, 9], tile_budget=3)
  assert len(e.tokens) == 3 + 2 * 730 and e.pixels.shape == (3, 384, 384, 3)
  assert (e.tokens == IMAGE_TOKEN_INDEX).sum() == 1460
  assert e.labels[e.tokens == IMAGE_TOKEN_INDEX].tolist() == [-100] * 1460
  assert e.labels[-1] == 9 and e.tokens[1 + 730] == 8
  # second image's tokens read tile 1; newline rows point at the newline slot; text rows have weight 0
  assert e.merge_idx[1 + 730 + 1, 0] == 729 and e.merge_idx[1 + 729, 0] == 3 * 729
  assert e.merge_w[0].sum() == 0 and e.merge_w[1].sum() == 1
  with pytest.raises(ValueError, match="placeholders"):
    mm.expand([IMAGE_TOKEN_INDEX], ims, CFG)
  with pytest.raises(ValueError, match="tile budget"):
    mm.expand(ids, ims, CFG, tile_budget=1)


def test_device_normalisation_is_the_processors_float32_formula_exactly():
  """Host tiles are uint8 (a quarter of the bytes); the model normalises them inside jit. Every one of the 256
  values, per channel, equals the processor's float32 (x * (1/255) - mean) / std bit for bit."""
  import jax
  from lladav_jax.config import VisionConfig
  from lladav_jax.model.vision import normalize_pixels
  x = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1, 256, 3]: every value, every channel
  cfg = VisionConfig(pixel_mean=(0.48145466, 0.4578275, 0.40821073), pixel_std=(0.26862954, 0.26130258, 0.27577711))
  for c in (VisionConfig(), cfg):
    want = (x.astype(np.float32) * np.float32(1 / 255) - np.asarray(c.pixel_mean, np.float32)) / np.asarray(
        c.pixel_std, np.float32)
    got = np.asarray(jax.jit(normalize_pixels, static_argnums=1)(x, c))
    assert got.dtype == np.float32 and np.array_equal(got, want)
