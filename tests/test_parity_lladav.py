"""Whole-model parity: LLaDA-V (image placeholder -> SigLIP -> mlp2x_gelu -> anyres merge with unpadding and
bilinear downscale / pad path / pooled video -> LLaDA) against an independent PyTorch computation of the
same steps (transformers SigLIP and LLaMA, torch Linear/GELU, F.interpolate), weights loaded from a
synthesized LLaDA-V safetensors checkpoint through weights.load_state."""
import dataclasses
import functools
import io
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.image_transforms import convert_to_rgb, normalize, rescale, resize
from transformers.image_utils import ChannelDimension, PILImageResampling, to_numpy_array

from lladav_jax import multimodal as mm
from lladav_jax import sharding, weights
from lladav_jax.api import _image_config as api_image_config
from lladav_jax.config import IMAGE_TOKEN_INDEX, VisionConfig
from lladav_jax.model.vision import normalize_pixels
from lladav_jax.model import abstract_model
from tests.test_parity_llm import MASK_ID, hf_logits, tiny_llama

TOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=384, patch_size=14,
              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


# ----------------------------------------------------------------------------- a tiny LLaDA-V checkpoint

def tiny_siglip(num_layers: int, seed: int = 0) -> SiglipVisionModel:
  """A random SigLIP tower (every weight random, norms around one)."""
  torch.manual_seed(seed)
  c = SiglipVisionConfig(num_hidden_layers=num_layers, **VISION)
  c._attn_implementation = "eager"
  m = SiglipVisionModel(c).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "layer_norm" in name or "layernorm" in name:
        p.copy_((1 if name.endswith("weight") else 0) + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return m


@dataclasses.dataclass
class TorchLLaDAV:
  llama: torch.nn.Module
  siglip: SiglipVisionModel
  projector: torch.nn.Sequential
  newline: torch.Tensor
  keep_layers: int  # vision layers LLaDA-V runs (the checkpoint has one more)

  def tensors(self) -> dict[str, np.ndarray]:
    """The state dict under LLaDA-V's names (extras included: the last vision layer, post_layernorm, head)."""
    sd = {k: v.detach().numpy().copy() for k, v in self.llama.state_dict().items()}
    for k, v in self.siglip.state_dict().items():
      sd[weights.VISION_PREFIX + k.removeprefix("vision_model.")] = v.detach().numpy().copy()
    for k, v in self.projector.state_dict().items():
      sd[f"model.mm_projector.{k}"] = v.detach().numpy().copy()
    sd["model.image_newline"] = self.newline.detach().numpy().copy()
    return sd

  def config_json(self) -> dict:
    c = self.llama.config.to_dict()
    c.update(mm_hidden_size=VISION["hidden_size"], mm_vision_tower="siglip-tiny", mm_projector_type="mlp2x_gelu",
             image_aspect_ratio="anyres_max_4", mask_token_id=MASK_ID,
             vision_config=dict(VISION, num_hidden_layers=self.keep_layers + 1))
    return c

  # -- the reference computation, in torch
  def features(self, tiles_NHWC: np.ndarray) -> torch.Tensor:
    """SigLIP output after `keep_layers` layers (before post_layernorm) -> projector: [T, P, D]."""
    with torch.no_grad():
      px = torch.from_numpy(tiles_NHWC).permute(0, 3, 1, 2)
      h = self.siglip(pixel_values=px, output_hidden_states=True).hidden_states[self.keep_layers]
      return self.projector(h)

  def embed_tokens(self, ids) -> torch.Tensor:
    with torch.no_grad():
      return self.llama.model.embed_tokens(torch.as_tensor(ids).long())


def build_torch_lladav(seed: int = 0, keep_layers: int = 2, num_kv_heads: int = 2, vocab: int = 512) -> TorchLLaDAV:
  llama = tiny_llama(num_kv_heads=num_kv_heads, seed=seed, vocab=vocab)
  siglip = tiny_siglip(keep_layers + 1, seed=seed + 1)
  torch.manual_seed(seed + 2)
  d_in, d = VISION["hidden_size"], llama.config.hidden_size
  proj = torch.nn.Sequential(torch.nn.Linear(d_in, d), torch.nn.GELU(), torch.nn.Linear(d, d)).eval()
  with torch.no_grad():
    for p in proj.parameters():
      p.copy_(0.3 * torch.randn_like(p))
  return TorchLLaDAV(llama, siglip, proj, 0.5 * torch.randn(d), keep_layers)


def write_hf_dir(path: str, tensors: dict[str, np.ndarray], config_json: dict, *, shards: int = 1,
                 dtypes: dict[str, object] | None = None, extra_files: dict[str, str] | None = None) -> str:
  """An HF directory: config.json, one model.safetensors or `shards` files + index.json."""
  os.makedirs(path, exist_ok=True)
  dtypes = dtypes or {}
  tensors = {k: (v.astype(dtypes[k]) if k in dtypes else v) for k, v in tensors.items()}
  names = list(tensors)
  if shards == 1:
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map, per = {}, math.ceil(len(names) / shards)
    for k in range(shards):
      fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
      part = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
      save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
      weight_map.update({n: fname for n in part})
    with open(os.path.join(path, weights.INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_json, f, indent=1)
  for fname, text in (extra_files or {}).items():
    with open(os.path.join(path, fname), "w") as f:
      f.write(text)
  return path


def tiny_lladav_dir(path: str, seed: int = 0, **kw) -> tuple[TorchLLaDAV, str]:
  ref = build_torch_lladav(seed)
  return ref, write_hf_dir(path, ref.tensors(), ref.config_json(), **kw)


# ----------------------------------------------------------------------------- the reference merges

def torch_anyres(feats: torch.Tensor, orig_size, cols: int, rows: int, newline: torch.Tensor, max_tiles=4):
  """spatial_unpad merge (docs/ORIGINAL.md, "Images"): base tokens; tile grid -> unpad -> bilinear downscale if
  times > 1.1 -> newline column -> row-major tokens."""
  g = math.isqrt(feats.shape[1])
  base, grid = feats[0], feats[1:]
  c = grid.shape[-1]
  fmap = grid.view(rows, cols, g, g, c).permute(4, 0, 2, 1, 3).reshape(c, rows * g, cols * g)
  ow, oh = orig_size
  ch, cw = fmap.shape[1:]
  if ow / oh > cw / ch:
    nh = int(oh * (cw / ow))
    pad = (ch - nh) // 2
    fmap = fmap[:, pad:ch - pad]
  else:
    nw = int(ow * (ch / oh))
    pad = (cw - nw) // 2
    fmap = fmap[:, :, pad:cw - pad]
  unpadded = tuple(fmap.shape[1:])
  h, w = unpadded
  times = math.sqrt(h * w / (max_tiles * g * g))
  if times > 1.1:
    fmap = F.interpolate(fmap[None], size=(int(h // times), int(w // times)), mode="bilinear",
                         align_corners=False)[0]
  fmap = torch.cat([fmap, newline[:, None, None].expand(c, fmap.shape[1], 1)], dim=2)
  return torch.cat([base, fmap.flatten(1).T]), unpadded, (ch, cw), times


def torch_video(feats: torch.Tensor, newline: torch.Tensor, stride: int = 2):
  """get_2dPool (bilinear, ceil(g / stride)) per frame, a newline after every row ("grid")."""
  g = math.isqrt(feats.shape[1])
  out = []
  for f in feats:
    fm = f.T.reshape(-1, g, g)
    fm = F.interpolate(fm[None], size=(math.ceil(g / stride),) * 2, mode="bilinear", align_corners=False)[0]
    fm = torch.cat([fm, newline[:, None, None].expand(fm.shape[0], fm.shape[1], 1)], dim=2)
    out.append(fm.flatten(1).T)
  return torch.cat(out)


# ----------------------------------------------------------------------------- the reference preprocessing

def ref_siglip_preprocess(img: Image.Image, size: int = 384) -> np.ndarray:
  """The original's SigLipImageProcessor (convert_to_rgb, resize bicubic to (size, size), rescale 1/255,
  normalize 0.5 / 0.5), through transformers' image_transforms: [S, S, 3]."""
  x = to_numpy_array(convert_to_rgb(img))
  x = resize(x, (size, size), resample=PILImageResampling.BICUBIC, input_data_format=ChannelDimension.LAST)
  x = rescale(x, 1 / 255, input_data_format=ChannelDimension.LAST)
  return normalize(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), input_data_format=ChannelDimension.LAST)


def ref_select_best_resolution(original_size, possible_resolutions):
  """llava/mm_utils.py select_best_resolution, transcribed."""
  original_width, original_height = original_size
  best_fit, max_effective, min_wasted = None, 0, float("inf")
  for width, height in possible_resolutions:
    scale = min(width / original_width, height / original_height)
    dw, dh = int(original_width * scale), int(original_height * scale)
    effective = min(dw * dh, original_width * original_height)
    wasted = (width * height) - effective
    if effective > max_effective or (effective == max_effective and wasted < min_wasted):
      max_effective, min_wasted, best_fit = effective, wasted, (width, height)
  return best_fit


def ref_anyres_tiles(img: Image.Image, size: int = 384):
  """llava/mm_utils.py process_anyres_image with the "(1x1),...,(6x6)" pinpoints, transcribed: the best
  resolution, resize_and_pad_image (scale first, then ceil), 384 px crops row-major, the base image first."""
  pinpoints = [[i * size, j * size] for i in range(1, 7) for j in range(1, 7)]
  best = ref_select_best_resolution(img.size, pinpoints)
  ow, oh = img.size
  tw, th = best
  scale_w, scale_h = tw / ow, th / oh
  if scale_w < scale_h:
    nw, nh = tw, min(math.ceil(oh * scale_w), th)
  else:
    nh, nw = th, min(math.ceil(ow * scale_h), tw)
  padded = Image.new("RGB", (tw, th), (0, 0, 0))
  padded.paste(img.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
  crops = [padded.crop((x, y, x + size, y + size)) for y in range(0, th, size) for x in range(0, tw, size)]
  tiles = [img.resize((size, size))] + crops
  return np.stack([ref_siglip_preprocess(t, size) for t in tiles]), tw // size, th // size


def ref_expand2square(img: Image.Image, fill=(127, 127, 127)) -> Image.Image:
  w, h = img.size
  if w == h:
    return img
  out = Image.new(img.mode, (max(w, h),) * 2, fill)
  out.paste(img, ((h - w) // 2, 0) if w < h else (0, (w - h) // 2))
  return out


# ----------------------------------------------------------------------------- tests

IMAGE_CFG = mm.ImageConfig()  # the released geometry: 384 px tiles, 14 px patches, anyres_max_4
assert (IMAGE_CFG.image_size, IMAGE_CFG.patch_size, IMAGE_CFG.aspect) == (384, 14, "anyres_max_4")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  ref, d = tiny_lladav_dir(str(tmp_path_factory.mktemp("lladav")))
  cfg = weights.load_model_config(d, dtype="float32", param_dtype="float32")
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  return ref, cfg, weights.load_state(d, cfg, mesh)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, pixels, idx, w):
  model = nnx.merge(graphdef, state)
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return model(tokens, pos, None, pixels, idx, w)


def normalized(tiles):
  """Our uint8 tiles as the model normalises them on device."""
  return np.asarray(normalize_pixels(tiles, VisionConfig()))


def ours(cfg, state, ids, images):
  e = mm.expand(ids, images, IMAGE_CFG)
  graphdef, _ = abstract_model(cfg)
  out = _forward(graphdef, state, jnp.asarray(e.tokens)[None], jnp.asarray(e.pixels)[None],
                 jnp.asarray(e.merge_idx)[None], jnp.asarray(e.merge_w)[None])
  return np.asarray(out)[0], e


def reference(ref: TorchLLaDAV, ids, image_tokens: list[torch.Tensor]):
  """Splices the reference image token sequences into the text embeddings, runs LLaMA bidirectionally."""
  parts, k = [], 0
  for t in ids:
    if t == IMAGE_TOKEN_INDEX:
      parts.append(image_tokens[k]); k += 1
    else:
      parts.append(ref.embed_tokens([t]))
  x = torch.cat(parts)[None]
  return hf_logits(ref.llama, None, inputs_embeds=x)[0]


def rand_image(w, h, seed):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def test_config_from_checkpoint(loaded):
  _, cfg, _ = loaded
  assert cfg.vision.num_layers == 2 and cfg.llm.num_kv_heads == 2
  assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.grid, cfg.vision.tokens_per_tile) == (384, 14, 27, 729)
  assert cfg.mask_token_id == MASK_ID


def test_text_only_matches_torch(loaded):
  ref, cfg, state = loaded
  ids = [5, 17, 42, 7, 9, 300]
  logits, _ = ours(cfg, state, ids, [])
  diff = np.abs(logits - reference(ref, ids, [])).max()
  print(f"lladav text only: max abs diff {diff:.3g}")
  assert diff <= TOL


# (size, grid (cols, rows), image tokens): a square under 384 px, a 2x3 grid, a 6x6 grid (max_4 downsample to
# 54 x 54), 1x1 and 4000x2 pixels, and two sizes at the resize-rounding edge: the original computes
# ceil(136 * (384 / 85)) = 615 -> min(615, 768) for 136x85 (float division first); ceil(136 * 384 / 85) = 615 too,
# but 85x136 gives ceil(85 * (384 / 136)) = 241 against ceil(85 * 384 / 136) = 240 (more edge sizes, without the
# model: test_image_fidelity.py). 38x152 and 25x50: thin images whose unpadded maps keep 7 and 13 columns.
ANYRES_CASES = [((300, 300), (1, 1), 729 + 27 * 28), ((700, 1000), (2, 3), None), ((2000, 2000), (6, 6), 729 + 54 * 55),
                ((1, 1), (1, 1), 729 + 27 * 28), ((4000, 2), (6, 1), 729 + 1 * 163), ((85, 136), (1, 1), None),
                ((136, 85), (1, 1), None), ((38, 152), (1, 1), 729 + 27 * (7 + 1)), ((25, 50), (1, 1), 729 + 27 * (13 + 1))]


@pytest.mark.parametrize("size,grid,n_tokens", ANYRES_CASES, ids=[f"{w}x{h}" for (w, h), _, _ in ANYRES_CASES])
def test_anyres_image_matches_torch(loaded, size, grid, n_tokens):
  ref, cfg, state = loaded
  img = rand_image(*size, seed=size[0] + size[1])
  x = mm.process_image(img, IMAGE_CFG)
  ref_tiles, cols, rows = ref_anyres_tiles(img)
  assert (cols, rows) == grid
  # the pixels the original feeds its tower (its padded resize and crops): 1 + cols * rows tiles
  assert x.tiles.shape == ref_tiles.shape == (1 + cols * rows, 384, 384, 3)
  assert np.abs(normalized(x.tiles) - ref_tiles).max() <= 1e-6
  img_tokens, unpadded, padded, times = torch_anyres(ref.features(ref_tiles), size, cols, rows, ref.newline)
  assert x.num_tokens == len(img_tokens) and (n_tokens is None or x.num_tokens == n_tokens)
  if grid == (6, 6):
    assert times > 1.1  # the max_4 bilinear downsample runs
  if size in ((700, 1000), (4000, 2)):
    assert unpadded != padded  # and so does the unpad
  ids = [5, 17, IMAGE_TOKEN_INDEX, 42, 7, 9]
  logits, e = ours(cfg, state, ids, [x])
  expect = reference(ref, ids, [img_tokens])
  assert logits.shape == expect.shape
  diff = np.abs(logits - expect).max()
  print(f"lladav anyres {size} ({x.num_tiles} tiles, {x.num_tokens} image tokens): max abs diff {diff:.3g}")
  assert diff <= TOL


def test_multi_image_pad_path_matches_torch(loaded):
  ref, cfg, state = loaded
  imgs = [rand_image(70, 40, 3), rand_image(30, 90, 4), rand_image(500, 400, 5)]
  xs = mm.process_sample_images(imgs, IMAGE_CFG)
  assert [x.num_tokens for x in xs] == [730, 730, 730]  # 729 + newline each
  ref_tiles = [ref_siglip_preprocess(ref_expand2square(im)) for im in imgs]
  for x, t in zip(xs, ref_tiles):
    assert np.abs(normalized(x.tiles[0]) - t).max() <= 1e-6
  toks = [torch.cat([ref.features(t[None])[0], ref.newline[None]]) for t in ref_tiles]
  ids = [3, IMAGE_TOKEN_INDEX, 8, IMAGE_TOKEN_INDEX, 11, IMAGE_TOKEN_INDEX]
  logits, _ = ours(cfg, state, ids, xs)
  diff = np.abs(logits - reference(ref, ids, toks)).max()
  print(f"lladav multi-image pad path: max abs diff {diff:.3g}")
  assert diff <= TOL


def test_multi_image_eval_path_matches_torch(loaded, tmp_path):
  # the original's lmms-eval: several images are stacked into one tensor -> encode_images (expand2square
  # with the mean, 729 tokens each, no newline); sizes at the rounding edge, a pixel, a line
  ref, cfg, state = loaded
  sizes = [(25, 50), (4000, 2)]
  imgs = [rand_image(w, h, seed=w + 2 * h) for w, h in sizes]
  d = write_hf_dir(str(tmp_path / "ckpt"), {}, ref.config_json())
  icfg = api_image_config(d, cfg)
  assert icfg.multi_image == "pad_flat"  # what LLaDAV.from_pretrained (eval, generation) runs
  xs = mm.process_sample_images(imgs, icfg)
  assert [x.num_tokens for x in xs] == [729] * 2
  ref_tiles = [ref_siglip_preprocess(ref_expand2square(im)) for im in imgs]
  for x, t in zip(xs, ref_tiles):
    assert np.abs(normalized(x.tiles[0]) - t).max() <= 1e-6
  toks = [ref.features(t[None])[0] for t in ref_tiles]
  ids = [3, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 11]
  logits, _ = ours(cfg, state, ids, xs)
  expect = reference(ref, ids, toks)
  assert logits.shape == expect.shape == (2 + 2 * 729, expect.shape[1])
  diff = np.abs(logits - expect).max()
  print(f"lladav multi-image eval path (pad_flat): max abs diff {diff:.3g}")
  assert diff <= TOL


def exif_jpeg(w, h, orientation=6) -> Image.Image:
  """A phone-style JPEG: stored w x h, EXIF orientation 6 (display rotated 90 degrees)."""
  img = rand_image(w, h, seed=7)
  exif = img.getexif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  img.save(buf, "JPEG", exif=exif, quality=95)
  buf.seek(0)
  return Image.open(buf)


def test_exif_orientation_is_not_applied_by_default(loaded):
  # the original opens with PIL and converts to RGB: the stored pixels, never rotated
  ref, cfg, state = loaded
  img = exif_jpeg(500, 300)
  ref_tiles, cols, rows = ref_anyres_tiles(img.convert("RGB"))
  assert (cols, rows) == (2, 1)
  x = mm.process_image(img, IMAGE_CFG)
  assert np.abs(normalized(x.tiles) - ref_tiles).max() <= 1e-6
  img_tokens = torch_anyres(ref.features(ref_tiles), img.size, cols, rows, ref.newline)[0]
  assert x.num_tokens == len(img_tokens) == 729 + 27 * (46 + 1)  # 27 x 54 map unpadded to 46 columns
  ids = [5, IMAGE_TOKEN_INDEX, 9]
  logits, _ = ours(cfg, state, ids, [x])
  diff = np.abs(logits - reference(ref, ids, [img_tokens])).max()
  print(f"lladav EXIF orientation 6, 500x300 stored: {x.num_tokens} image tokens, max abs diff {diff:.3g}")
  assert diff <= TOL
  # the option: upright (300 x 500 displayed), the (1, 2) grid
  rotated = mm.process_image(img, dataclasses.replace(IMAGE_CFG, exif_transpose=True))
  assert rotated.num_tiles == 3 and rotated.num_tokens == 729 + 46 * (27 + 1)


def test_video_pooled_matches_torch(loaded):
  ref, cfg, state = loaded
  frames = [rand_image(64, 48, 10 + i) for i in range(3)]
  x = mm.process_video(frames, IMAGE_CFG)
  assert x.num_tokens == 3 * 14 * 15  # 27 -> ceil(27 / 2) = 14 per side, a newline after every row
  ref_tiles = np.stack([ref_siglip_preprocess(f) for f in frames])
  assert np.abs(normalized(x.tiles) - ref_tiles).max() <= 1e-6
  toks = torch_video(ref.features(ref_tiles), ref.newline)
  ids = [4, IMAGE_TOKEN_INDEX, 6]
  logits, _ = ours(cfg, state, ids, [x])
  diff = np.abs(logits - reference(ref, ids, [toks])).max()
  print(f"lladav video (3 frames pooled): max abs diff {diff:.3g}")
  assert diff <= TOL


def test_bf16_checkpoint_loads_exactly(tmp_path):
  ref = build_torch_lladav(seed=5)
  t = ref.tensors()
  d = write_hf_dir(str(tmp_path / "bf16"), t, ref.config_json(), dtypes={k: ml_dtypes.bfloat16 for k in t})
  cfg = weights.load_model_config(d, dtype="float32", param_dtype="float32")
  state = weights.load_state(d, cfg, sharding.make_mesh(devices=jax.devices()[:1]))
  flat = weights.flat_params(state)
  q = np.asarray(flat["llm.layers.attn.q_proj"])
  assert q.dtype == np.float32
  src = t["model.layers.1.self_attn.q_proj.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(q[1], src.T.reshape(q.shape[1:]))
  patch = np.asarray(flat["vision.patch_kernel"])
  src = t[weights.VISION_PREFIX + "embeddings.patch_embedding.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(patch, src.transpose(2, 3, 1, 0).reshape(patch.shape))
