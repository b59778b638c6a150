"""Host-side image processing and merge plans (NumPy + PIL, no JAX).

An image (or video) becomes an `ImageInput`: its 384px tiles (uint8 RGB; the model normalises them
on device, see VisionConfig.pixel_mean / pixel_std), and a *plan* with one
row per output token. Row i lists up to TAPS (tile-table index, weight) pairs whose weighted sum
is token i's feature, so the device splices every layout with one static-shape gather:
  - anyres (single image): base tile (729 tokens), then the tile grid unpadded to the original
    aspect ratio, bilinearly downscaled when it exceeds max_tiles * 729 * 1.1, plus a newline
    after every row (docs/ORIGINAL.md, "Images");
  - pad (several images, training): expand2square(fill 127) -> 729 tokens + 1 newline;
  - pad_flat (several images, the original's lmms-eval): expand2square(fill 127) -> 729 tokens, no newline;
  - flat (stage-1 "square"): resized to the tile, 729 tokens, no newline;
  - video: per frame, 2x2 bilinear pooling 27 -> 14 (196 tokens), newlines as configured.
Bilinear weights replicate torch F.interpolate(mode="bilinear", align_corners=False), float32.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from lladav_jax.config import IMAGE_TOKEN_INDEX, TAPS

NEWLINE = -1  # plan sentinel: the learned image_newline vector
ZERO = -2     # plan sentinel: an unused tap (zero vector, weight 0)

DEFAULT_PINPOINTS = tuple((i, j) for i in range(1, 7) for j in range(1, 7))
MULTI_IMAGE_MODES = ("pad", "pad_flat")
VIDEO_NEWLINES = ("grid", "frame", "one_token", "no_token")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  image_size: int = 384
  patch_size: int = 14
  # "anyres_max_N" (spatial_unpad), "pad" (expand2square + newline) or "square" (flat, no newline).
  aspect: str = "anyres_max_4"
  grid_pinpoints: tuple = DEFAULT_PINPOINTS  # (i, j) multiples of image_size, read as (width, height)
  # Several images in one sample: "pad" (the original's training: 729 + newline each) or "pad_flat" (its
  # lmms-eval model: the images stacked into one tensor take encode_images' flat path, 729 each, no newline).
  multi_image: str = "pad"
  video_pool_stride: int = 2
  video_newline: str = "grid"  # "grid" | "frame" | "one_token" | "no_token"
  # expand2square's fill is the processor's mean as 8-bit (the original: int(m * 255)).
  mean: tuple = (0.5, 0.5, 0.5)
  # The original opens images with PIL and never applies the EXIF orientation; True rotates them upright.
  exif_transpose: bool = False

  def __post_init__(self):
    errs = []
    if not (re.fullmatch(r"anyres_max_[1-9]\d*", self.aspect) or self.aspect in ("pad", "square")):
      errs.append(f"image.aspect={self.aspect!r} must be 'anyres_max_N', 'pad' or 'square'")
    if self.multi_image not in MULTI_IMAGE_MODES:
      errs.append(f"image.multi_image={self.multi_image!r} must be one of {MULTI_IMAGE_MODES}")
    if self.video_newline not in VIDEO_NEWLINES:
      errs.append(f"image.video_newline={self.video_newline!r} must be one of {VIDEO_NEWLINES}")
    if not isinstance(self.exif_transpose, bool):
      errs.append(f"image.exif_transpose={self.exif_transpose!r} must be True or False")
    if errs:
      raise ValueError("; ".join(errs))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ImageConfig":
    """The inverse of to_dict after a JSON round trip (lists back to the tuples of the frozen fields)."""
    tuples = {"grid_pinpoints": lambda v: tuple(map(tuple, v)), "mean": tuple}
    return cls(**{k: tuples[k](v) if k in tuples else v for k, v in d.items()})

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def tokens_per_tile(self) -> int:
    return self.grid ** 2

  @property
  def max_area_tiles(self) -> int:
    return int(self.aspect.rsplit("_", 1)[1]) if self.aspect.startswith("anyres_max_") else 0


@dataclasses.dataclass
class ImageInput:
  tiles: np.ndarray  # [T, S, S, 3] uint8 RGB
  plan_idx: np.ndarray  # [N, TAPS] int32: tile*P + pos, or NEWLINE / ZERO
  plan_w: np.ndarray  # [N, TAPS] float32

  @property
  def num_tokens(self) -> int:
    return self.plan_idx.shape[0]

  @property
  def num_tiles(self) -> int:
    return self.tiles.shape[0]


# ----------------------------------------------------------------------------- pixels

def to_rgb(img: Image.Image, exif_transpose: bool = False) -> Image.Image:
  """Any mode (16-bit, palette, CMYK, RGBA, ...) converted to 8-bit RGB; the EXIF orientation applied only
  with `exif_transpose` (the original never applies it: ImageConfig.exif_transpose)."""
  if exif_transpose:
    img = ImageOps.exif_transpose(img)
  if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    a = np.asarray(img, dtype=np.float64)
    hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
    img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  return img.convert("RGB")


def tile(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
  """SigLIP's resize: bicubic to (S, S) -> uint8 [S, S, 3] (the scaling and normalisation run on device)."""
  s = cfg.image_size
  if img.size != (s, s):
    img = img.resize((s, s), Image.BICUBIC)
  return np.asarray(img, dtype=np.uint8)


def select_best_resolution(size: tuple[int, int], candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """LLaVA-NeXT: maximise the effective resolution, then minimise waste; ties keep the earlier."""
  w, h = size
  best, best_eff, best_waste = None, -1, float("inf")
  for cw, ch in candidates:
    scale = min(cw / w, ch / h)
    dw, dh = int(w * scale), int(h * scale)
    eff = min(dw * dh, w * h)
    waste = cw * ch - eff
    if eff > best_eff or (eff == best_eff and waste < best_waste):
      best, best_eff, best_waste = (cw, ch), eff, waste
  return best


def resize_and_pad(img: Image.Image, target: tuple[int, int]) -> Image.Image:
  """Aspect-preserving bicubic resize into `target` (w, h), centred on black. The scale is divided out
  first, as the original does (ceil(85 * (384 / 136)) = 241, where ceil(85 * 384 / 136) = 240)."""
  w, h = img.size
  tw, th = target
  scale_w, scale_h = tw / w, th / h
  if scale_w < scale_h:
    nw, nh = tw, min(math.ceil(h * scale_w), th)
  else:
    nh, nw = th, min(math.ceil(w * scale_h), tw)
  canvas = Image.new("RGB", (tw, th), (0, 0, 0))
  canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
  return canvas


def expand2square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  canvas = Image.new(img.mode, (side, side), fill)
  canvas.paste(img, ((side - w) // 2, 0) if w < h else (0, (side - h) // 2))
  return canvas


# ----------------------------------------------------------------------------- plans

def bilinear_taps(in_size: int, out_size: int):
  """torch's align_corners=False source indices and weights along one axis (float32 math)."""
  scale = np.float32(in_size) / np.float32(out_size)
  i0, i1, l0, l1 = [], [], [], []
  for dst in range(out_size):
    # torch's kernel contracts scale*(dst+0.5)-0.5 into one FMA: exact product, one rounding.
    src = max(np.float32(np.float64(scale) * np.float64(np.float32(dst + 0.5)) - 0.5), np.float32(0))
    a = int(src)
    b = a + (1 if a < in_size - 1 else 0)
    lam = np.float32(min(max(src - np.float32(a), np.float32(0)), np.float32(1)))
    i0.append(a); i1.append(b); l1.append(lam); l0.append(np.float32(1) - lam)
  return np.array(i0), np.array(i1), np.array(l0, np.float32), np.array(l1, np.float32)


def resize_plan(src_idx: np.ndarray, out_hw: tuple[int, int]):
  """Plan rows for bilinearly resizing a map whose cells are single table indices [h, w]."""
  h, w = src_idx.shape
  y0, y1, ly0, ly1 = bilinear_taps(h, out_hw[0])
  x0, x1, lx0, lx1 = bilinear_taps(w, out_hw[1])
  idx = np.stack([src_idx[y0][:, x0], src_idx[y0][:, x1], src_idx[y1][:, x0], src_idx[y1][:, x1]], -1)
  wts = np.stack([ly0[:, None] * lx0[None], ly0[:, None] * lx1[None], ly1[:, None] * lx0[None],
                  ly1[:, None] * lx1[None]], -1).astype(np.float32)
  return idx, wts  # [oh, ow, TAPS]


def _single(idx_hw: np.ndarray):
  """Plan cells that copy one table entry: [h, w] -> ([h, w, TAPS], [h, w, TAPS])."""
  idx = np.full(idx_hw.shape + (TAPS,), ZERO, np.int32)
  idx[..., 0] = idx_hw
  w = np.zeros(idx_hw.shape + (TAPS,), np.float32)
  w[..., 0] = 1
  return idx, w


def _with_row_newlines(idx, w):
  """Appends a newline column to an [h, w, TAPS] plan map and flattens it row-major."""
  h = idx.shape[0]
  nl_idx, nl_w = _single(np.full((h, 1), NEWLINE, np.int32))
  return (np.concatenate([idx, nl_idx], 1).reshape(-1, TAPS), np.concatenate([w, nl_w], 1).reshape(-1, TAPS))


def _newline_row():
  i, w = _single(np.array([NEWLINE], np.int32))
  return i, w


def anyres_plan(orig_size: tuple[int, int], cols: int, rows: int, cfg: ImageConfig):
  """Plan for base + (rows x cols) tiles of an image of original size (w, h)."""
  g, p = cfg.grid, cfg.tokens_per_tile
  base_idx, base_w = _single(np.arange(p, dtype=np.int32).reshape(g, g))
  # Feature map (rows*g, cols*g) of table indices; tile t = 1 + r*cols + c (tile 0 is the base).
  yy, xx = np.meshgrid(np.arange(rows * g), np.arange(cols * g), indexing="ij")
  fmap = ((1 + (yy // g) * cols + xx // g) * p + (yy % g) * g + xx % g).astype(np.int32)
  # unpad to the original aspect ratio
  ow, oh = orig_size
  ch, cw = fmap.shape
  if ow / oh > cw / ch:
    nh = int(oh * (cw / ow))
    pad = (ch - nh) // 2
    fmap = fmap[pad:ch - pad]
  else:
    nw = int(ow * (ch / oh))
    pad = (cw - nw) // 2
    fmap = fmap[:, pad:cw - pad]
  h, w = fmap.shape
  times = math.sqrt(h * w / (cfg.max_area_tiles * g * g))
  if times > 1.1:
    idx, wts = resize_plan(fmap, (int(h // times), int(w // times)))
  else:
    idx, wts = _single(fmap)
  idx, wts = _with_row_newlines(idx, wts)
  return (np.concatenate([base_idx.reshape(-1, TAPS), idx]), np.concatenate([base_w.reshape(-1, TAPS), wts]))


def process_image(img: Image.Image, cfg: ImageConfig, mode: str | None = None) -> ImageInput:
  """One image -> tiles + plan. `mode`: "anyres" (default for aspect anyres_*), "pad", "pad_flat", "flat"."""
  img = to_rgb(img, cfg.exif_transpose)
  if img.width < 1 or img.height < 1:
    raise ValueError(f"image has zero size {img.size}")
  mode = mode or ("anyres" if cfg.aspect.startswith("anyres") else cfg.aspect)
  p = cfg.tokens_per_tile
  single = _single(np.arange(p, dtype=np.int32).reshape(cfg.grid, cfg.grid))
  if mode == "anyres":
    s = cfg.image_size
    cands = [(i * s, j * s) for i, j in cfg.grid_pinpoints]
    bw, bh = select_best_resolution(img.size, cands)
    canvas = resize_and_pad(img, (bw, bh))
    tiles = [img.resize((s, s), Image.BICUBIC)]
    tiles += [canvas.crop((x, y, x + s, y + s)) for y in range(0, bh, s) for x in range(0, bw, s)]
    idx, w = anyres_plan(img.size, bw // s, bh // s, cfg)
    return ImageInput(np.stack([tile(t, cfg) for t in tiles]), idx, w)
  if mode in ("pad", "pad_flat"):
    fill = tuple(int(m * 255) for m in cfg.mean)
    square = tile(expand2square(img, fill), cfg)
    if mode == "pad_flat":
      return ImageInput(square[None], single[0].reshape(-1, TAPS), single[1].reshape(-1, TAPS))
    nl_i, nl_w = _newline_row()
    return ImageInput(square[None], np.concatenate([single[0].reshape(-1, TAPS), nl_i]),
                      np.concatenate([single[1].reshape(-1, TAPS), nl_w]))
  if mode in ("flat", "square"):
    return ImageInput(tile(img, cfg)[None], single[0].reshape(-1, TAPS), single[1].reshape(-1, TAPS))
  raise ValueError(f"unknown image mode {mode!r}")


def process_video(frames: Sequence[Image.Image], cfg: ImageConfig) -> ImageInput:
  """Frames -> one tile each, pooled to ceil(g / stride)^2 tokens, newlines per cfg.video_newline."""
  g, p = cfg.grid, cfg.tokens_per_tile
  out = math.ceil(g / cfg.video_pool_stride)
  idx_f, w_f = [], []
  for f in range(len(frames)):
    i, w = resize_plan((f * p + np.arange(p, dtype=np.int32)).reshape(g, g), (out, out))
    if cfg.video_newline == "grid":
      i, w = _with_row_newlines(i, w)
    else:
      i, w = i.reshape(-1, TAPS), w.reshape(-1, TAPS)
      if cfg.video_newline == "frame":
        nl = _newline_row()
        i, w = np.concatenate([i, nl[0]]), np.concatenate([w, nl[1]])
    idx_f.append(i); w_f.append(w)
  idx, w = np.concatenate(idx_f), np.concatenate(w_f)
  if cfg.video_newline == "one_token":
    nl = _newline_row()
    idx, w = np.concatenate([idx, nl[0]]), np.concatenate([w, nl[1]])
  tiles = np.stack([tile(to_rgb(fr, cfg.exif_transpose), cfg) for fr in frames])
  return ImageInput(tiles, idx, w)


def process_sample_images(images: Sequence, cfg: ImageConfig) -> list[ImageInput]:
  """The reference's choice per sample: anyres for one image, the multi-image mode for several; a
  sample whose only visual is a list of frames is a video (one placeholder, pooled frames)."""
  if len(images) == 1 and isinstance(images[0], (list, tuple)):
    return [process_video(images[0], cfg)]
  if len(images) == 1:
    return [process_image(images[0], cfg)]
  return [process_image(im, cfg, mode=cfg.multi_image) for im in images]


# ----------------------------------------------------------------------------- sequences

@dataclasses.dataclass
class Expanded:
  tokens: np.ndarray  # [L] int32, IMAGE_TOKEN_INDEX at image positions
  labels: np.ndarray | None  # [L] int32 (IGNORE at image positions) or None
  pixels: np.ndarray  # [T, S, S, 3] uint8
  merge_idx: np.ndarray  # [L, TAPS] int32, absolute into the [T*P | newline | zero] table
  merge_w: np.ndarray  # [L, TAPS] float32


def expand(ids: Sequence[int], images: Sequence[ImageInput], cfg: ImageConfig, *, labels=None,
           tile_budget: int | None = None, ignore_index: int = -100) -> Expanded:
  """Replaces each IMAGE_TOKEN_INDEX in `ids` by that image's tokens and builds its merge plan.

  Tiles of all images are concatenated, padded with zeros to `tile_budget` (default: exactly what
  the images need; `batch.collate` re-packs them into the batch's budget). Raises ValueError if the counts of placeholders and images differ or the
  tiles do not fit the budget.
  """
  ids = np.asarray(ids, np.int64)
  n_ph = int((ids == IMAGE_TOKEN_INDEX).sum())
  if n_ph != len(images):
    raise ValueError(f"{n_ph} image placeholders but {len(images)} images")
  p, s = cfg.tokens_per_tile, cfg.image_size
  n_tiles = sum(im.num_tiles for im in images)
  budget = n_tiles if tile_budget is None else tile_budget
  if n_tiles > budget:
    raise ValueError(f"images need {n_tiles} tiles, more than the tile budget {budget}")
  newline, zero = budget * p, budget * p + 1
  tok, lab, m_idx, m_w = [], [], [], []
  text_idx = np.full((1, TAPS), zero, np.int32)
  text_w = np.zeros((1, TAPS), np.float32)
  offset, k = 0, 0
  labels = None if labels is None else np.asarray(labels, np.int64)
  for pos, t in enumerate(ids):
    if t == IMAGE_TOKEN_INDEX:
      im = images[k]; k += 1
      idx = np.where(im.plan_idx >= 0, im.plan_idx + offset * p,
                     np.where(im.plan_idx == NEWLINE, newline, zero)).astype(np.int32)
      offset += im.num_tiles
      tok.append(np.full(im.num_tokens, IMAGE_TOKEN_INDEX, np.int32))
      lab.append(np.full(im.num_tokens, ignore_index, np.int32))
      m_idx.append(idx); m_w.append(im.plan_w)
    else:
      tok.append(np.array([t], np.int32))
      lab.append(np.array([ignore_index if labels is None else labels[pos]], np.int32))
      m_idx.append(text_idx); m_w.append(text_w)
  pixels = np.zeros((budget, s, s, 3), np.uint8)
  if images:
    pixels[:n_tiles] = np.concatenate([im.tiles for im in images])
  cat = (lambda xs, shape, dt: np.concatenate(xs) if xs else np.zeros(shape, dt))
  return Expanded(cat(tok, (0,), np.int32), None if labels is None else cat(lab, (0,), np.int32), pixels,
                  cat(m_idx, (0, TAPS), np.int32), cat(m_w, (0, TAPS), np.float32))
