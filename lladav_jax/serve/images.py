"""Image URLs of a chat request -> decoded PIL images, through the training data's loader
(`data.records`: the root check of `Opener.path`, `open_image`'s size limits and decompression-bomb
guard; odd modes are converted to RGB later by `multimodal`, as for training data).

data: URLs (PNG, JPEG, WebP) always; file:// URLs and plain paths only under --image-root; http(s) never:
the server makes no network requests."""
from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Optional

from PIL import Image

from lladav_jax.data import records
from lladav_jax.serve.protocol import FieldError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)", re.S)


def load(url: str, param: str, *, image_root: Optional[str], max_bytes: int, max_pixels: int) -> Image.Image:
  """The image `url` names, decoded; FieldError(param) naming what is wrong with it."""
  if url.startswith("data:"):
    data = _data_url(url, param, max_bytes)
    ref = "data: URL"
  elif re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
    scheme = url.split(":", 1)[0]
    raise FieldError(param, f"{scheme} image URLs are not fetched (the server makes no network requests); "
                     "send the image as a data: URL")
  else:
    ref = url[len("file://"):] if url.startswith("file://") else url
    data = _local_file(ref, param, image_root, max_bytes)
  try:
    img = records.open_image(data, ref, max_pixels=max_pixels)
  except records.Skip as e:
    raise FieldError(param, f"the image could not be used ({e.reason}): {e.detail}") from None
  if img.format not in FORMATS:
    raise FieldError(param, f"{img.format or 'unknown'} images are not accepted; send PNG, JPEG or WebP")
  return img


def _data_url(url: str, param: str, max_bytes: int) -> bytes:
  m = _DATA_URL.fullmatch(url)
  if not m:
    raise FieldError(param, "a data: URL must be data:image/png|jpeg|webp;base64,<data>")
  mime = (m["mime"] or "").lower()
  if mime not in FORMATS.values():
    raise FieldError(param, f"data: URL of type {mime or 'none'}; send image/png, image/jpeg or image/webp")
  if len(m["data"]) > (max_bytes + 2) // 3 * 4 + 4:
    raise FieldError(param, f"the image is larger than {max_bytes} bytes")
  try:
    return base64.b64decode(m["data"], validate=True)
  except (binascii.Error, ValueError):
    raise FieldError(param, "the data: URL is not valid base64") from None


def _local_file(ref: str, param: str, image_root: Optional[str], max_bytes: int) -> bytes:
  if not image_root:
    raise FieldError(param, "local image paths are refused (the server was started without --image-root); "
                     "send the image as a data: URL")
  try:
    opener = records.Opener({}, image_root)
    path = opener.path(ref)
    if os.path.isfile(path) and os.path.getsize(path) > max_bytes:
      raise FieldError(param, f"the image is larger than {max_bytes} bytes")
    return opener.data(ref)
  except records.Skip as e:
    raise FieldError(param, f"{e.reason}: {e.detail}") from None
