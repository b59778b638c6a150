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
  with pytest.raises(TypeError, match=r"images\[0\]: a list of PIL images \(prompt 0's\), not Image"):
    model.logits([[1, IMAGE_TOKEN_INDEX]], images=[image()])
  with pytest.raises(ValueError, match=r"1 prompts but 2 image lists"):
    model.logits([[1, 2]], images=[[], []])


def test_valid_ids_pass_at_both_ends_of_the_range(model):
  x = model.prepare([[0, IMAGE_TOKEN_INDEX, V - 1], [V - 1, 0]], images=[[image()], []])
  toks = np.asarray(x.tokens)
  assert toks.shape[0] == 2 and toks[0, 0] == 0 and toks[1, 0] == V - 1
  assert int((toks[0] == IMAGE_TOKEN_INDEX).sum()) > 0


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
  from tests.serving import write_tiny_model
  _, m = write_tiny_model(str(tmp_path_factory.mktemp("api")))

  def never(*a, **k):
    raise AssertionError("bad input reached the engine")

  m.state = None  # every case here must be refused before the weights are read
  m._logits_fn = never
  return m


@pytest.mark.parametrize("call, error, message", [
    (lambda m: m.generate("hello"), TypeError, r"prompts: a list of strings, one a request, not str \(for one: \['hello'\]\)"),
    (lambda m: m.generate([123]), TypeError, r"prompts\[0\]: a string, not int"),
    (lambda m: m.generate(["hi"], [image()]), TypeError, r"images\[0\]: a list of PIL images \(prompt 0's\), not Image"),
    (lambda m: m.generate(["hi"], [["cat.jpg"]]), TypeError, r"images\[0\]\[0\]: a PIL.Image.Image, not str"),
    (lambda m: m.generate(["hi"], [[np.zeros((4, 4, 3), np.uint8)]]), TypeError, r"images\[0\]\[0\]: .* not ndarray"),
    (lambda m: m.generate(["hi"], [[[image(), "f.png"]]]), TypeError, r"images\[0\]\[0\]\[1\] \(a video frame\)"),
    (lambda m: m.generate(["hi"], [[Image.new("RGB", (0, 3))]]), ValueError, r"images\[0\]\[0\]: an image of 0 x 3"),
    (lambda m: m.generate(["a", "b"], [[]]), ValueError, r"2 prompts but 1 image lists"),
    (lambda m: m.generate(["hi"], None, {"gen_length": 8}), TypeError, r"params: a SamplingParams, not dict"),
    (lambda m: m.elbo(["a", "b"], None, ["x"]), ValueError, r"2 prompts but 1 answers"),
    (lambda m: m.logits([[1, IMAGE_TOKEN_INDEX, 2]], [["x.png"]]), TypeError, r"images\[0\]\[0\]: a PIL.Image.Image"),
])
def test_bad_prompts_images_and_params_are_refused_naming_the_argument(chat_model, call, error, message):
  with pytest.raises(error, match=message):
    call(chat_model)
