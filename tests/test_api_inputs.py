"""LLaDAV.prepare / LLaDAV.logits refuse token ids the model has no embedding for, and placeholder counts that
do not match the images, on the host: an out-of-range id reaching the jitted forward gives non-finite logits."""
import numpy as np
import pytest
from PIL import Image

from lladav_jax import config
from lladav_jax.config import IMAGE_TOKEN_INDEX
from tests.models import random_model

V = 512  # config.tiny()'s vocabulary


@pytest.fixture(scope="module")
def model():
  m = random_model(config.tiny(vocab_size=V))

  def never(*a, **k):
    raise AssertionError("bad input reached the jitted forward")

  m._logits_fn = never  # every case here must be refused before it
  return m


def image():
  return Image.fromarray(np.full((20, 30, 3), 128, np.uint8))


@pytest.mark.parametrize("bad, pos", [(V, 2), (10 ** 6, 1), (-1, 3), (-100, 0)])
def test_an_id_outside_the_vocabulary_names_sample_position_id_and_range(model, bad, pos):
  rows = [[1, 2, 3, 4], [1, 2, 3, 4]]
  rows[1][pos] = bad
  want = (rf"input_ids\[1\]\[{pos}\] = {bad} is not a token id of this model: valid ids are 0\.\.{V - 1} "
          rf"\(vocab_size={V}\), or -200 for an image")
  with pytest.raises(ValueError, match=want):
    model.logits(rows)
  with pytest.raises(ValueError, match=want):
    model.prepare(np.array(rows))


def test_the_first_bad_id_is_named_and_the_rest_counted(model):
  with pytest.raises(ValueError, match=r"input_ids\[0\]\[1\] = 600 .* \(2 more bad ids in this sample\)"):
    model.logits([[1, 600, 2, -5, V]])


def test_a_one_dimensional_array_is_one_sample(model):
  with pytest.raises(ValueError, match=r"input_ids\[0\]\[2\] = 512 "):
    model.logits(np.array([1, 2, V]))


def test_placeholders_must_match_the_images_of_their_sample(model):
  rows = [[1, IMAGE_TOKEN_INDEX, 2], [1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 2]]
  with pytest.raises(ValueError, match=r"input_ids\[1\] has 2 image placeholders \(-200\) but images\[1\] has 1 "):
    model.logits(rows, images=[[image()], [image()]])
  with pytest.raises(ValueError, match=r"input_ids\[0\] has 1 image placeholders \(-200\) but images\[0\] has 0 "):
    model.logits(rows[:1])
  with pytest.raises(ValueError, match=r"input_ids\[0\] has 0 image placeholders \(-200\) but images\[0\] has 1 "):
    model.logits([[1, 2]], images=[[image()]])


def test_malformed_rows_and_image_lists(model):
  with pytest.raises(ValueError, match=r"input_ids\[0\]: token ids must be integers, got dtype float64"):
    model.logits([[1.0, 2.5]])
  with pytest.raises(ValueError, match=r"input_ids\[0\]: expected a 1-D sequence"):
    model.logits([1, 2, 3])  # a flat list: one sample is [[1, 2, 3]]
  with pytest.raises(ValueError, match=r"images\[0\] is one image: give a list of images per sample"):
    model.logits([[1, IMAGE_TOKEN_INDEX]], images=[image()])
  with pytest.raises(ValueError, match=r"1 samples but 2 image lists"):
    model.logits([[1, 2]], images=[[], []])


def test_valid_ids_pass_at_both_ends_of_the_range(model):
  x = model.prepare([[0, IMAGE_TOKEN_INDEX, V - 1], [V - 1, 0]], images=[[image()], []])
  toks = np.asarray(x.tokens)
  assert toks.shape[0] == 2 and toks[0, 0] == 0 and toks[1, 0] == V - 1
  assert int((toks[0] == IMAGE_TOKEN_INDEX).sum()) > 0
