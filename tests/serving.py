"""Servers under test: a tiny model directory (demo tokenizer, random weights whose head answers in words)
written as a trained model is (`weights.save_model`), and `python -m lladav_jax.serve` on it in a
subprocess on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from lladav_jax import config, weights
from lladav_jax.data.demo_data import ensure_demo_data
from lladav_jax.data.tokenizer import Tokenizer
from tests.models import random_model
from tests.train_helpers import inference_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The test servers' launch limits: 4 lanes (prompt buckets 128 and 2048 x answer buckets 16 and 128) and
# up to 5 tiles a request, so that warm-up compiles few programs. A server's own flags come after (and win).
TEST_LIMITS = ("--max-model-len", "2048", "--max-answer-tokens", "128", "--prompt-buckets", "128",
               "--answer-buckets", "16", "--max-tiles", "5")


def write_tiny_model(root: str):
  """A loadable model directory under `root` and the LLaDAV it holds (for generate in the test process)."""
  paths = ensure_demo_data(os.path.join(root, "demo"), num_train=4, num_val=1, num_test=1)
  tok = Tokenizer.from_dir(paths["tokenizer_dir"])
  model = random_model(config.tiny(vocab_size=tok.vocab_size, mask_token_id=tok.mask_id), 1, {"lm_head": 30.0},
                       tokenizer=tok)
  path = weights.save_model(os.path.join(root, "tiny-lladav"), model.cfg, model.state,
                            tokenizer_dir=paths["tokenizer_dir"])
  return path, model


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ServerProcess:
  """`python -m lladav_jax.serve MODEL_DIR LIMITS ARGS` on a free port (CPU, served from the first device),
  ready (warm) on return."""

  def __init__(self, model_dir: str, *args: str, env: dict | None = None, log_path: str | None = None,
               timeout: float = 300, limits: tuple = TEST_LIMITS):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    e = inference_env()
    e.update(env or {})
    self.log_path = log_path
    self.log = open(log_path, "w") if log_path else subprocess.DEVNULL
    self.proc = subprocess.Popen([sys.executable, "-m", "lladav_jax.serve", model_dir, "--port", str(self.port),
                                  *limits, *args], env=e, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while True:
      if self.proc.poll() is not None:
        raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
      try:
        if httpx.get(self.url + "/health", timeout=2).status_code == 200:
          return
      except httpx.HTTPError:
        pass
      if time.monotonic() > deadline:
        self.stop()
        raise TimeoutError(f"the server was not ready in {timeout} s:\n{self.output()}")
      time.sleep(0.2)

  def output(self) -> str:
    if not self.log_path:
      return ""
    self.log.flush()
    with open(self.log_path) as f:
      return f.read()[-5000:]

  def stop(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(30)
    if self.log_path:
      self.log.close()
