"""Video from real files: H.264 mp4, VP9 webm and a variable-frame-rate clip encoded here with PyAV (FFmpeg),
each frame a flat colour that encodes its own index, so a test reads back which frames were chosen and
compares them with the original's formulas (process_video_with_decord for training, lmms-eval's load_video
for evaluation), transcribed below independently of lladav_jax; then end to end through the record
processor of the training pipeline and the eval plugin; and the safeguards (corrupt, truncated, empty,
huge, outside the folder), each a named skip."""
import fractions
import json
import os

import av
import numpy as np
import pytest
from PIL import Image

from lladav_jax import multimodal
from lladav_jax.config import IMAGE_TOKEN_INDEX as IMG
from lladav_jax.data import pipeline, records
from lladav_jax.eval.lmms_plugin import read_video
from tests.test_data_images import processor as image_processor, tok  # noqa: F401 (a fixture)


def colour(i):
  return (i % 16) * 16 + 8, (i // 16) * 16 + 8, 128


def index_of(img):
  r, g, _ = np.asarray(img.convert("RGB"), np.float64)[8:-8, 8:-8].reshape(-1, 3).mean(0)
  return int(round((r - 8) / 16)) + 16 * int(round((g - 8) / 16))


def encode(path, n, fps, codec="libx264", size=(64, 48), pts=None):
  """n frames of frame i's colour; `pts` (in 1/1000 s) gives a variable frame rate."""
  w, h = size
  with av.open(str(path), "w") as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    if pts is not None:
      s.codec_context.time_base = fractions.Fraction(1, 1000)
    for i in range(n):
      a = np.empty((h, w, 3), np.uint8)
      a[:] = colour(i)
      frame = av.VideoFrame.from_ndarray(a, format="rgb24")
      if pts is not None:
        frame.pts, frame.time_base = pts[i], fractions.Fraction(1, 1000)
      for p in s.encode(frame):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return str(path)


def original_training_indices(total, avg_fps, video_fps=1.0, frames_upbound=32):
  """process_video_with_decord: frame_idx = range(0, total, round(avg_fps / video_fps)), then
  linspace(0, total - 1, frames_upbound) when there are more than frames_upbound."""
  step = round(avg_fps / video_fps)
  idx = [i for i in range(0, total, step)]
  if frames_upbound > 0 and len(idx) > frames_upbound:
    idx = np.linspace(0, total - 1, frames_upbound, dtype=int).tolist()
  return idx


def pick_training(video_fps=1.0, frames_upbound=32):
  return lambda total, fps: records.sample_frame_indices(total, fps, video_fps=video_fps,
                                                         frames_upbound=frames_upbound)[0]


def read(path, pick, max_pixels=10 ** 8):
  with open(path, "rb") as f:
    return records.decode_video(f, os.path.basename(path), pick, max_pixels=max_pixels)


# (frames, fps, codec, container, frames_upbound): below and above the upbound, webm without a frame count
CASES = [(90, 30, "libx264", "a.mp4", 32), (100, 25, "libx264", "b.mp4", 3), (40, 10, "libvpx-vp9", "c.webm", 32),
         (7, 2, "libx264", "short.mp4", 32), (60, 24, "libx264", "d.mp4", 0)]


@pytest.mark.parametrize("n,fps,codec,name,upbound", CASES, ids=[c[3] for c in CASES])
def test_training_frames_are_the_originals(tmp_path, n, fps, codec, name, upbound):
  path = encode(tmp_path / name, n, fps, codec)
  frames = read(path, pick_training(frames_upbound=upbound))
  expect = original_training_indices(n, fps, frames_upbound=upbound)
  assert [index_of(f) for f in frames] == expect
  assert all(f.size == (64, 48) and f.mode == "RGB" for f in frames)


def test_variable_frame_rate_clip(tmp_path):
  """Frames at irregular times (30 frames over 3.3 s, gaps of 50-200 ms): indices count frames in presentation
  order and the rate is the stream's average (decord's get_avg_fps: frames / duration)."""
  gaps = [50, 200, 100, 50, 150] * 6
  pts = np.concatenate([[0], np.cumsum(gaps)[:-1]]).tolist()
  path = encode(tmp_path / "vfr.mp4", 30, 10, pts=pts)
  with av.open(path) as c:
    s = c.streams.video[0]
    total, avg = s.frames, float(s.average_rate)
  assert total == 30 and 8.5 < avg < 9.5
  frames = read(path, pick_training(video_fps=2.0))
  assert [index_of(f) for f in frames] == original_training_indices(30, avg, video_fps=2.0)


def test_frame_times_as_the_original_keeps_them():
  idx, times = records.sample_frame_indices(90, 30.0, video_fps=1.0, frames_upbound=32)
  assert idx == [0, 30, 60] and times == [0.0, 1.0, 2.0]  # i / round(fps / video_fps)
  idx, times = records.sample_frame_indices(100, 25.0, frames_upbound=3)
  assert idx == [0, 49, 99] and times == [0.0, 49 / 25, 99 / 25]  # i / fps after the uniform resampling
  assert records.sample_frame_indices(5, 0.2, video_fps=1.0)[0] == [0, 1, 2, 3, 4]  # the original: range step 0


def test_eval_plugin_samples_uniformly(tmp_path):
  """lmms-eval's load_video: linspace(0, total - 1, max_frames_num) whatever the frame rate."""
  path = encode(tmp_path / "e.mp4", 50, 25)
  frames = read_video(path, max_frames_num=8)
  assert [index_of(f) for f in frames] == np.linspace(0, 49, 8, dtype=int).tolist()


def processor(tok, folder, **kw):
  """The training pipeline's per-record map at the released geometry, 4 frames at most."""
  return image_processor(tok, folder, multimodal.ImageConfig(), **{"seq_len": 8192, "tile_budget": 8,
                                                                   "frames_upbound": 4, **kw})


def rec(video):
  r = {"id": "v", "video": video, "conversations": [{"from": "human", "value": "<image>\nWhat happens?"},
                                                    {"from": "gpt", "value": "red"}]}
  return ("k", json.dumps(r).encode())


def test_a_training_sample_from_an_mp4(tok, tmp_path):
  encode(tmp_path / "clip.mp4", 120, 30)  # 4 frames at 1 fps: 0, 30, 60, 90
  out = processor(tok, tmp_path)(rec("clip.mp4"))
  assert isinstance(out, pipeline.Sample), out
  assert out.expanded.pixels.shape == (4, 384, 384, 3)
  assert (out.expanded.tokens == IMG).sum() == 4 * 14 * 15  # 27 -> 14 per side, a newline after every row
  want = [multimodal.tile(Image.new("RGB", (64, 48), colour(i)), multimodal.ImageConfig()) for i in (0, 30, 60, 90)]
  # H.264 keeps flat colours within a few levels
  assert np.abs(out.expanded.pixels.astype(int) - np.stack(want).astype(int)).max() <= 12


def test_bad_videos_are_named_skips(tok, tmp_path):
  good = encode(tmp_path / "good.mp4", 30, 10)
  data = open(good, "rb").read()
  (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
  (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
  (tmp_path / "empty.mp4").write_bytes(b"")
  with av.open(str(tmp_path / "audio_only.mp4"), "w") as c:  # a valid file with no video stream
    s = c.add_stream("aac", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 8000
    for _ in range(4):
      for p in s.encode(frame):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  outside = tmp_path.parent / "outside.mp4"
  outside.write_bytes(data)
  proc = processor(tok, tmp_path)
  expect = {"random.mp4": "corrupt_video", "truncated.mp4": "corrupt_video", "empty.mp4": "zero_size_video",
            "audio_only.mp4": "corrupt_video", "missing.mp4": "missing_video", "../outside.mp4": "outside_video_folder",
            str(outside): "outside_video_folder"}
  for ref, reason in expect.items():
    out = proc(rec(ref))
    assert out.reason == reason and os.path.basename(ref) in out.detail, (ref, out)
  huge = processor(tok, tmp_path, max_image_pixels=64 * 48 - 1)(rec("good.mp4"))
  assert huge.reason == "decompression_bomb" and "64x48" in huge.detail, huge
  assert isinstance(proc(rec("good.mp4")), pipeline.Sample)


def test_a_grain_training_batch_with_a_video_record(tok, tmp_path):
  """A LLaVA JSON with a video record and an image record, through the Grain training iterator."""
  encode(tmp_path / "clip.mp4", 60, 30)  # 2 frames at 1 fps: 0, 30
  Image.new("RGB", (300, 200), (255, 0, 0)).save(tmp_path / "red.png")
  recs = [{"id": "v", "video": "clip.mp4", "conversations": [{"from": "human", "value": "<image>\nWhat happens?"},
                                                             {"from": "gpt", "value": "red"}]},
          {"id": "i", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"},
                                                            {"from": "gpt", "value": "red"}]}]
  (tmp_path / "data.json").write_text(json.dumps(recs))
  cfg = pipeline.DataConfig(path=str(tmp_path / "data.json"), image_folder=str(tmp_path), seq_len=4480, buckets=(4480,),
                            tile_budget=8)
  it = pipeline.build_train_iterator(cfg, tok, multimodal.ImageConfig(), batch_size_per_process=2, process_index=0,
                                     process_count=1, seed=0)
  b = next(it)
  n_img = sorted(int(x) for x in (b.inputs.tokens == IMG).sum(1))
  red = multimodal.process_image(Image.open(tmp_path / "red.png"), multimodal.ImageConfig()).num_tokens
  assert n_img == sorted([2 * 14 * 15, red])  # the video row: 2 frames of 14 x 15 tokens
  assert b.inputs.pixels.shape == (2, 2, 384, 384, 3)  # the smallest tile bucket holding 2 frames / 2 tiles
