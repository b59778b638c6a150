"""The original's image paths where they are easy to get wrong, without the model: resize rounding at its
edge, EXIF orientation, the image config's checks, and inference tile buckets (every tile run, few compiles)."""
import types

import numpy as np
import pytest
from PIL import Image

from lladav_jax import config
from lladav_jax import multimodal as mm
from lladav_jax.config import IMAGE_TOKEN_INDEX as IMG
from lladav_jax.inference import SamplingParams, generation, prompts as prompt_lib
from lladav_jax.inference.engine import TRACE_COUNTS
from tests.models import random_model
from tests.test_parity_lladav import normalized, rand_image, ref_anyres_tiles

CFG = mm.ImageConfig()


# (w, h): where the original's ceil(h * (384 * k / w)) (float division first) differs from ceil(h * 384 * k / w):
# 85x272 (121 against 120 rows), 2200x1925 on a 6x6 grid (2017 against 2016); the thin and tiny sizes.
@pytest.mark.parametrize("size", [(85, 272), (272, 85), (2200, 1925), (38, 152), (25, 50), (1, 1), (4000, 2), (2, 4000)])
def test_anyres_tiles_are_the_originals_at_the_rounding_edge(size):
  img = rand_image(*size, seed=size[0] * 7 + size[1])
  x = mm.process_image(img, CFG)
  ref, cols, rows = ref_anyres_tiles(img)  # a transcription of process_anyres_image + the SigLIP processor
  assert x.tiles.shape[0] == 1 + cols * rows
  assert np.abs(normalized(x.tiles) - ref).max() <= 1e-6


def _exif_image(w, h, orientation=6):
  import io
  img = Image.new("RGB", (w, h), (200, 10, 10))
  exif = img.getexif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  img.save(buf, "JPEG", exif=exif)
  buf.seek(0)
  return Image.open(buf)


def test_exif_orientation_only_on_request():
  img = _exif_image(6, 3)
  assert mm.to_rgb(img).size == (6, 3)  # the original: PIL's stored pixels
  assert mm.to_rgb(img, exif_transpose=True).size == (3, 6)
  assert not CFG.exif_transpose
  rotated = mm.process_video([_exif_image(60, 20)], mm.ImageConfig(exif_transpose=True))
  np.testing.assert_array_equal(rotated.tiles[0], mm.tile(mm.to_rgb(_exif_image(60, 20), True), CFG))


@pytest.mark.parametrize("kw,field", [(dict(exif_transpose="yes"), "image.exif_transpose"),
                                      (dict(multi_image="flat"), "image.multi_image"),
                                      (dict(video_newline="row"), "image.video_newline"),
                                      (dict(aspect="anyres"), "image.aspect")])
def test_image_config_names_a_bad_field(kw, field):
  with pytest.raises(ValueError, match=field):
    mm.ImageConfig(**kw)


# ----------------------------------------------------------------------------- inference tile buckets

def test_tile_buckets():
  # anyres_max_4 grids + base: 1x1 2, 2x2 5, 3x3 10, 4x4 17, 5x5 26, 6x6 37; 32 video frames
  assert [prompt_lib.bucket_tiles(n) for n in (0, 1, 2, 3, 7, 10, 11, 31, 32, 33, 37, 38, 80)] == \
         [0, 1, 2, 5, 10, 10, 17, 32, 32, 37, 37, 74, 111]


def test_largest_grid_and_32_frames_keep_every_tile():
  model = types.SimpleNamespace(image_cfg=CFG)
  big = rand_image(2000, 2000, seed=1)  # the 6x6 grid: 37 tiles
  frames = [rand_image(64, 48, seed=k) for k in range(32)]
  x = prompt_lib.prepare_inputs(model, [[5, IMG, 6], [7, IMG]], [[big], [frames]], seeds=[0, 1], rows=2)
  p = x.prompt
  assert p.pixels.shape[:2] == (2, 37)
  np.testing.assert_array_equal(p.pixels[0], mm.process_image(big, CFG).tiles)
  np.testing.assert_array_equal(p.pixels[1, :32], mm.process_video(frames, CFG).tiles)
  image_pos = p.tokens == IMG
  assert image_pos.sum(1).tolist() == [729 + 54 * 55, 32 * 14 * 15]
  # every tile is read by the merge plan: 37 base/grid tiles in row 0, the 32 frames in row 1
  used = [np.unique(p.merge_idx[r][image_pos[r]] // 729) for r in range(2)]
  assert set(range(37)) <= set(used[0].tolist()) and set(range(32)) <= set(used[1].tolist())
  with pytest.raises(ValueError, match="tiles=16"):
    prompt_lib.prepare_inputs(model, [[5, IMG, 6]], [[big]], seeds=[0], rows=1, tiles=16)


def test_images_of_one_tile_bucket_compile_once():
  model = random_model(config.tiny(), 0)
  st = SamplingParams(mask_id=500, banned_ids=(1,), eot_id=None, gen_length=4, block_length=4, steps=2)
  run = lambda img: generation.generate_ids(model, [[5, IMG, 6]], [[img]], params=st, batch_size=1,
                                            length_multiple=2048)
  run(rand_image(700, 300, seed=2))  # a 2x1 grid: 3 tiles (bucket 5), 1994 image positions
  before = sum(TRACE_COUNTS.values())
  (out,) = run(rand_image(768, 300, seed=3))  # another size, the same buckets: 3 tiles, 1884 image positions
  assert sum(TRACE_COUNTS.values()) == before
  assert len(out.token_ids) == 4
