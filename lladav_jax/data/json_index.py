"""Byte-offset indexes of LLaVA JSON / JSONL files and a random-access source over them.

A training JSON can hold millions of records (10M records ~ 11 GB). Grain pickles the source into
every worker, so the source holds only file paths and index paths: one vectorised pass over the file
finds each record's byte span (int64 [n, 2] start / end; JSONL adds the 1-based line number), saved
as .npy in a cache folder keyed by path + size + mtime and memory-mapped, so it is built once per
file version and shared (page cache) by every process. `__getitem__` reads and returns one record's
bytes (`os.pread`); parsing stays in the pipeline's map step, where a malformed record is a
`malformed_json` skip.

Cache folder: $LLADAV_JAX_INDEX_DIR, else ~/.cache/lladav_jax/json_index. When it cannot be written
the index stays in memory (16-24 bytes a record, pickled to workers) and a warning says so.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import threading

import numpy as np

log = logging.getLogger(__name__)

_VERSION = 1  # bump when the index layout changes: older files are then never read
_CHUNK = 2 << 20  # bytes scanned at a time: the scan's temporaries are ~10x this (a few MiB)


class JsonIndexError(ValueError):
  """The file is not one JSON list (its top level is another value, or not valid JSON)."""


def cache_dir() -> str:
  return os.environ.get("LLADAV_JAX_INDEX_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lladav_jax",
                                                                  "json_index")


def _file_key(path: str) -> str:
  st = os.stat(path)
  return hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{_VERSION}".encode()).hexdigest()[:20]


def _nonws(a: np.ndarray) -> np.ndarray:
  """JSON's whitespace is 4 bytes. Comparisons, not a table lookup: indexing by a uint8 array makes an
  8-byte index per byte."""
  return (a != 32) & (a != 10) & (a != 13) & (a != 9)


_STRIP = np.zeros(256, bool)
_STRIP[list(b" \t\r\n\x0b\x0c")] = True  # what bytes.strip() removes: a JSONL line of only these is blank


def _chunks(f):
  """(offset, uint8 array) pieces of a file read in order: the scan holds one piece at a time (a memory
  map would count the whole file as resident)."""
  lo = 0
  while b := f.read(_CHUNK):
    yield lo, np.frombuffer(b, np.uint8)
    lo += len(b)


def _escaped(a: np.ndarray, q: np.ndarray, carry: int) -> list[int]:
  """The quotes among positions `q` of `a` after an odd run of backslashes (`carry`: the run that ends
  the previous piece). Backslashes before quotes are rare: checked one by one."""
  out = []
  for c in q[((q > 0) & (a[np.maximum(q - 1, 0)] == 92)) | ((q == 0) & (carry > 0))].tolist():
    k = c - 1
    while k >= 0 and a[k] == 92:
      k -= 1
    if (c - 1 - k + (carry if k < 0 else 0)) % 2:
      out.append(c)
  return out


def _trailing_backslashes(a: np.ndarray, carry: int) -> int:
  if not a.size or a[-1] != 92:
    return 0
  other = np.flatnonzero(a != 92)
  return a.size - 1 - other[-1] if other.size else a.size + carry


def scan_json_list(path: str) -> np.ndarray:
  """int64 [n, 2]: the byte span of each element of the top-level JSON list (whitespace around an
  element included). Quotes after an odd run of backslashes are escaped; brackets, braces and commas
  inside strings are ignored. Raises JsonIndexError if the top level is not one list."""
  seps, quotes, depth, closed, carry, started = [], 0, 0, -1, 0, False
  with open(path, "rb") as f:
    for lo, a in _chunks(f):
      if not started:
        m = _nonws(a)
        i = int(m.argmax())  # the first value's first byte
        if not m[i]:
          continue
        if a[i] != 91:
          raise JsonIndexError(f"expected a JSON list of records, got {'an object' if a[i] == 123 else 'not a list'}")
        started = True
      q = np.flatnonzero(a == 34)
      esc = _escaped(a, q, carry)
      if esc:
        q = np.setdiff1d(q, esc, assume_unique=True)
      carry = _trailing_backslashes(a, carry)
      folded = a | 32  # '[' -> '{', ']' -> '}'
      s = np.flatnonzero((folded == 123) | (folded == 125) | (a == 44))
      s = s[(np.searchsorted(q, s) + quotes) % 2 == 0]  # outside strings: an even number of quotes before
      quotes += q.size
      if s.size:
        ch = a[s]
        delta = np.where((ch == 91) | (ch == 123), 1, np.where((ch == 93) | (ch == 125), -1, 0))
        after = depth + np.cumsum(delta)
        before = after - delta
        if (after < 0).any() or (before[1:] == 0).any() or closed >= 0:
          raise JsonIndexError("not valid JSON: more than one top-level value or unbalanced brackets")
        top = ((ch == 44) & (before == 1)) | ((ch == 93) & (after == 0)) | ((ch == 91) & (before == 0))
        seps.append(s[top] + lo)
        if after[-1] == 0:
          closed = lo + int(s[-1])
        depth = int(after[-1])
      if closed >= 0 and _nonws(a[max(0, closed + 1 - lo):]).any():
        raise JsonIndexError("not valid JSON: data after the list")
    if not started:
      raise JsonIndexError("empty file")
    if depth or quotes % 2 or closed < 0:
      raise JsonIndexError("not valid JSON: unterminated list or string")
    seps = np.concatenate(seps)
    spans = np.stack([seps[:-1] + 1, seps[1:]], 1).astype(np.int64)
    if len(spans) == 1 and not os.pread(f.fileno(), int(spans[0, 1] - spans[0, 0]), int(spans[0, 0])).strip():
      spans = spans[:0]  # []
  return spans


def scan_jsonl(path: str) -> np.ndarray:
  """int64 [n, 3]: start, end (newline excluded) and 1-based line number of each non-blank line."""
  nls, firsts, last = [], [], 10
  with open(path, "rb") as f:
    for lo, a in _chunks(f):
      nl = np.flatnonzero(a == 10)
      st = nl + 1
      st = st[st < a.size]
      if last == 10:  # a line starts where this piece does
        st = np.concatenate([[0], st])
      nls.append(nl + lo)
      firsts.append(a[st])
      last = a[-1]
    size = f.tell()
    nl = np.concatenate(nls or [np.zeros(0, np.int64)])
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [size]]).astype(np.int64)
    lines = np.arange(1, len(starts) + 1, dtype=np.int64)
    content = np.zeros(len(starts), bool)
    content[starts < size] = ~_STRIP[np.concatenate(firsts or [np.zeros(0, np.uint8)])]  # first byte not blank
    for i in np.flatnonzero((ends > starts) & ~content).tolist():  # lines that open with blanks (rare)
      content[i] = bool(os.pread(f.fileno(), int(ends[i] - starts[i]), int(starts[i])).strip())
  keep = content & (ends > starts)
  return np.stack([starts[keep], ends[keep], lines[keep]], 1)


def load_index(path: str):
  """The index of `path` (.jsonl: lines, else a JSON list): (the .npy path, or the array itself when
  the cache folder cannot be written), the record count. Built on first use, then read back."""
  d = cache_dir()
  npy = os.path.join(d, f"{os.path.basename(path)}.{_file_key(path)}.npy")
  if os.path.exists(npy):
    return npy, int(np.load(npy, mmap_mode="r").shape[0])
  idx = scan_jsonl(path) if path.endswith(".jsonl") else scan_json_list(path)
  return _save(npy, idx, f"index of {path}"), len(idx)


def _save(npy: str, arr: np.ndarray, what: str):
  try:
    os.makedirs(os.path.dirname(npy), exist_ok=True)
    tmp = f"{npy}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as f:
      np.save(f, arr)
    os.replace(tmp, npy)  # atomic: concurrent builders (hosts, processes) never see half a file
    return npy
  except OSError as e:
    log.warning("cannot write the %s to %s (%s): kept in memory and copied into every worker", what, npy, e)
    return arr


def cached_picks(path: str, strategy: str, rng: np.random.Generator, pick) -> str | np.ndarray:
  """A mix's selected record numbers (`pick()`, e.g. a seeded random subset) saved like an index;
  keyed by the file version, the strategy and the generator's state before the draw."""
  state = json.dumps(rng.bit_generator.state, sort_keys=True, default=str)
  key = hashlib.sha1(f"{_file_key(path)}|{strategy}|{state}".encode()).hexdigest()[:20]
  npy = os.path.join(cache_dir(), f"{os.path.basename(path)}.pick.{key}.npy")
  arr = np.asarray(pick(), np.int64)  # drawn even when cached: the mix's later draws follow from it
  if os.path.exists(npy):
    return npy
  return _save(npy, arr, f"record selection of {path}")


class IndexedJsonSource:
  """Random-access `(key, raw JSON bytes)` over parts of indexed JSON / JSONL files.

  A part: (data path, index (.npy path or array), selection: None (all), (lo, hi) or record numbers
  (.npy path or array)). Keys: `file:line` (JSONL) or `file#i` (JSON list). Only paths
  and a few integers are pickled; indexes are memory-mapped and files opened lazily per process.
  """

  def __init__(self, parts: list[tuple]):
    self._parts = [tuple(p) for p in parts]
    self._lens = [self._part_len(p) for p in self._parts]
    self._ends = np.cumsum(self._lens).tolist()
    self._open()

  def _part_len(self, part) -> int:
    _, index, sel = part
    if sel is None:
      return int(_array(index).shape[0])
    if isinstance(sel, tuple):
      return sel[1] - sel[0]
    return int(_array(sel).shape[0])

  def _open(self):
    self._lock = threading.Lock()
    self._fds: dict[int, int] = {}
    self._arrays: dict = {}

  def __getstate__(self):
    return {"_parts": self._parts, "_lens": self._lens, "_ends": self._ends}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self):
    return self._ends[-1] if self._ends else 0

  def _arr(self, a):
    if not isinstance(a, str):
      return a
    got = self._arrays.get(a)
    if got is None:
      # Once per array, under the lock: np.load parses the header with ast, which CPython 3.11.7 cannot run
      # in two threads at once (SystemError: AST constructor recursion depth mismatch).
      with self._lock:
        got = self._arrays.get(a)
        if got is None:
          got = self._arrays[a] = np.load(a, mmap_mode="r")
    return got

  def _fd(self, k: int) -> int:
    fd = self._fds.get(k)
    if fd is None:
      with self._lock:
        fd = self._fds.get(k)
        if fd is None:
          fd = self._fds[k] = os.open(self._parts[k][0], os.O_RDONLY)
    return fd

  def __getitem__(self, i: int):
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} out of range [0, {len(self)})")
    k = bisect.bisect_right(self._ends, i)
    j = i - (self._ends[k - 1] if k else 0)
    path, index, sel = self._parts[k]
    r = j if sel is None else sel[0] + j if isinstance(sel, tuple) else int(self._arr(sel)[j])
    row = self._arr(index)[r]
    start, end = int(row[0]), int(row[1])
    raw = os.pread(self._fd(k), end - start, start)
    name = os.path.basename(path)
    return (f"{name}:{int(row[2])}" if len(row) > 2 else f"{name}#{r}"), raw

  def __del__(self):
    for fd in getattr(self, "_fds", {}).values():
      try:
        os.close(fd)
      except OSError:
        pass

  def __repr__(self):
    return f"IndexedJsonSource({len(self)} records from {len(self._parts)} part(s))"


def _array(a):
  return np.load(a, mmap_mode="r") if isinstance(a, str) else a
