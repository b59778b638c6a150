"""python -m lladav_jax.serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--dtype D] [--api-key KEY]
[--served-model-name NAME] [--image-root DIR] [--max-num-seqs N] [--max-queue N] [--max-model-len N]
[--max-answer-tokens N] [--max-tiles N] [--cache none|prefix|dual] [--enable-cfg] [--compilation-cache-dir DIR]

One engine serves every request within the launch limits (--max-model-len, --max-answer-tokens, --max-tiles,
--max-block-length under the dual cache): its lanes (prompt buckets x answer buckets) are compiled at warm-up,
before /health says ready, and no request compiles afterwards; a request beyond a limit gets 400 naming its
flag. Flags are vLLM's where it has one. The key may also come from $LLADAV_API_KEY. SIGTERM: new requests get
503, the running and queued ones finish, then the process exits 0."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Sequence

import jax
import uvicorn

from lladav_jax.api import LLaDAV
from lladav_jax.serve.app import create_app
from lladav_jax.serve.config import ServeConfig

API_KEY_ENV = "LLADAV_API_KEY"
# A second start of the same server reads its compiled programs from here instead of compiling them again.
DEFAULT_COMPILATION_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "lladav_jax", "xla")
log = logging.getLogger("lladav_jax.serve")
EXIT_STATUS = """Exit status: 0 stopped (SIGTERM: the running and queued requests finished first); 1 an error while
loading or warming up (its traceback); 2 a usage error (argparse: a missing or bad argument, a MODEL_DIR or
--image-root that does not exist, a limit the model cannot hold)."""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m lladav_jax.serve", description=__doc__.split("\n\n")[0],
                              epilog=EXIT_STATUS)
  p.add_argument("model", metavar="MODEL_DIR", help="what LLaDAV.from_pretrained takes (HF, Orbax or a trained model/)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--dtype", default=None, help="parameter and compute dtype (default: the checkpoint's)")
  p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                 help=f"required as 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}; none: open)")
  p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the directory's)")
  p.add_argument("--image-root", default=None,
                 help="file:// URLs and paths are read only under this folder (default: refused)")
  p.add_argument("--max-num-seqs", type=int, default=8, help="engine rows: answers generated at once")
  p.add_argument("--max-queue", type=int, default=64, help="answers waiting for a row; beyond: 429")
  p.add_argument("--max-image-bytes", type=int, default=20 << 20)
  p.add_argument("--max-model-len", type=int, default=None,
                 help="prompt positions (image features included) + max_tokens a request may have (default: 4096, "
                      "or the model's positions if fewer)")
  p.add_argument("--max-answer-tokens", type=int, default=512, help="the largest max_tokens a request may ask for")
  p.add_argument("--max-tiles", type=int, default=10, help="image tiles (384 px) a request's images may make")
  p.add_argument("--max-block-length", type=int, default=32,
                 help="--cache dual: the longest block_length (the window a cached step runs); other caches take any")
  p.add_argument("--prompt-buckets", default=None,
                 help="comma-separated prompt positions of the engine's lanes (default: 64, 128, 256, ..., "
                      "then --max-model-len)")
  p.add_argument("--answer-buckets", default=None,
                 help="comma-separated answer positions of the engine's lanes (default: 32, 128, 512, ..., "
                      "then --max-answer-tokens)")
  p.add_argument("--row-group", type=int, default=1,
                 help="rows a forward pass runs at once; a group without a running request is skipped")
  p.add_argument("--mm-cache-gb", type=float, default=4.0,
                 help="the vision tower's features by image tile, kept for requests that send the same image")
  p.add_argument("--cache", choices=["none", "prefix", "dual"], default="none",
                 help="the engines' KV cache (Fast-dLLM prefix / dual); requests cannot pick another")
  p.add_argument("--enable-cfg", action="store_true",
                 help="run the unconditional pass so that requests may set cfg_scale > 0 (twice the work a step)")
  p.add_argument("--compilation-cache-dir", default=DEFAULT_COMPILATION_CACHE,
                 help="persistent XLA compilation cache: a restart skips compiling (default: $JAX_COMPILATION_CACHE_DIR "
                      "or ~/.cache/lladav_jax/xla; 'none': off)")
  p.add_argument("--log-level", default="info", help="debug also shows other libraries' INFO lines")
  return p


class DrainingServer(uvicorn.Server):
  """uvicorn, except that SIGTERM drains: the app answers 503 to new requests while the listening socket
  stays open, and the server exits (0) once the engine is idle and the streams are closed."""

  def __init__(self, config, srv):
    super().__init__(config)
    self.srv = srv

  def handle_exit(self, sig, frame):
    if sig != signal.SIGTERM or self.srv.draining:
      return super().handle_exit(sig, frame)
    self.srv.draining = True  # not recorded as a captured signal: uvicorn would re-raise it after shutdown
    threading.Thread(target=self._drain, daemon=True).start()

  def _drain(self):
    while not (self.srv.sched.idle and self.srv.open_streams == 0):
      time.sleep(0.05)
    self.should_exit = True


def main(argv: Sequence[str] | None = None):
  parser = build_parser()
  args = parser.parse_args(argv)
  for name, v in (("--max-num-seqs", args.max_num_seqs), ("--max-queue", args.max_queue),
                  ("--max-model-len", args.max_model_len or 1), ("--max-answer-tokens", args.max_answer_tokens),
                  ("--max-block-length", args.max_block_length), ("--row-group", args.row_group)):
    if v < 1:
      parser.error(f"{name} {v}: must be >= 1")
  if args.max_tiles < 0 or args.mm_cache_gb < 0:
    parser.error("--max-tiles and --mm-cache-gb must be >= 0")
  if args.max_num_seqs % args.row_group:
    parser.error(f"--row-group {args.row_group} must divide --max-num-seqs {args.max_num_seqs}")
  buckets = {}
  for flag in ("prompt_buckets", "answer_buckets"):
    text = getattr(args, flag)
    try:
      buckets[flag] = tuple(int(v) for v in text.split(",")) if text else ()
    except ValueError:
      parser.error(f"--{flag.replace('_', '-')} {text!r}: comma-separated positive integers")
    if any(v < 1 for v in buckets[flag]):
      parser.error(f"--{flag.replace('_', '-')} {text!r}: comma-separated positive integers")
  if args.image_root and not os.path.isdir(args.image_root):
    parser.error(f"--image-root {args.image_root!r}: no such directory")
  if not os.path.isdir(args.model):
    parser.error(f"MODEL_DIR {args.model!r}: no such directory")
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
  if args.log_level.lower() != "debug":  # other libraries' INFO lines (checkpoint restore, backend probing)
    for noisy in ("absl", "orbax", "jax._src", "etils"):
      logging.getLogger(noisy).setLevel(logging.WARNING)
  if args.compilation_cache_dir.lower() != "none":
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
  t0 = time.monotonic()
  log.info("loading %s", args.model)
  model = LLaDAV.from_pretrained(args.model, dtype=args.dtype)
  log.info("loaded in %.1f s", time.monotonic() - t0)
  name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
  positions = model.cfg.llm.max_position_embeddings
  if args.max_model_len and args.max_model_len > positions:
    parser.error(f"--max-model-len {args.max_model_len}: the model has {positions} positions")
  app = create_app(model, ServeConfig(served_model_name=name, api_key=args.api_key or None,
                                      image_root=args.image_root, max_num_seqs=args.max_num_seqs,
                                      max_queue=args.max_queue, max_image_bytes=args.max_image_bytes,
                                      cache=None if args.cache == "none" else args.cache,
                                      enable_cfg=args.enable_cfg,
                                      max_model_len=args.max_model_len or min(4096, positions),
                                      max_answer_tokens=args.max_answer_tokens, max_tiles=args.max_tiles,
                                      max_block_length=args.max_block_length, row_group=args.row_group,
                                      mm_cache_bytes=int(args.mm_cache_gb * (1 << 30)), **buckets))
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5)
  DrainingServer(config, app.state.server).run()


if __name__ == "__main__":
  main()
