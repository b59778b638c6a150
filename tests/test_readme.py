"""The README's shell commands, as a new user runs them: every command of its shell code blocks (fenced ```bash /
```sh / ```console, and the indented blocks of its first lines) is either run here, in a fresh folder with a
fresh $HOME and this interpreter first on PATH, with the tiny limits of the table below added, or skipped with the
reason it cannot run on a CPU without weights or network. A command that is neither (a new one, or one changed
past its entry's pattern) fails the test, and so does an entry no command matches: the README stays honest.

The run commands are the demo's chain: the training (2 steps, a 4-sample final eval instead of 600 steps and 300)
writes runs/demo/model and the demo data under ~/.cache, which the eval, generate, convert and curl commands then
use as written."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import subprocess
import time
from typing import Callable

import pytest

from tests.train_helpers import PYTHON, REPO, subprocess_env

README = os.path.join(REPO, "README.md")
SHELL = {"bash", "sh", "shell", "console", "zsh"}
NOT_SHELL = {"python", "json", "yaml", "toml", "text", "html", "diff"}  # not commands: not run here


@dataclasses.dataclass(frozen=True)
class Command:
  line: int  # the README line it starts on
  text: str  # as bash runs it: comments dropped, continuation lines kept

  @property
  def flat(self) -> str:
    """Whitespace collapsed, backslash-newlines joined: what the table's patterns match."""
    return " ".join(self.text.replace("\\\n", " ").split())


@dataclasses.dataclass(frozen=True)
class Entry:
  """How the README commands that `pattern` matches (re.match on Command.flat) are treated: skipped for `skip`
  (the reason), else run with `add` appended (the tiny limits, each with its reason in `why`), after `setup(ws)`
  and with `before` (shell) in front, then `check(ws, result)`."""
  name: str
  pattern: str
  skip: str = ""
  add: str = ""
  why: str = ""
  before: str = ""
  setup: Callable | None = None
  check: Callable | None = None


# ----------------------------------------------------------------------------- checks of the commands that run

def _trained(ws, r):
  assert "demo test exact-match:" in r.stdout, r.stdout[-2000:]
  assert os.path.isfile(os.path.join(ws, "runs", "demo", "model", "lladav_config.json"))


def _evaluated(ws, r):
  with open(os.path.join(ws, "runs", "eval", "demo.json")) as f:
    res = json.load(f)
  assert res["task"] == "demo" and res["num_samples"] == 4 and res["num_skipped"] == 0, res
  assert "exact_match" in r.stdout


def _stage3_stand_in(ws):
  os.makedirs(os.path.join(ws, "exp", "llada_v_vw"))
  os.symlink(os.path.join(ws, "runs", "demo", "model"), os.path.join(ws, "exp", "llada_v_vw", "model"))


def _exported(ws, r):
  with open(os.path.join(ws, "exp", "LLaDA-V-hf", "model.safetensors.index.json")) as f:
    assert json.load(f)["weight_map"]


def _request_body(ws, r):
  """The stub's record of curl's arguments: the body is a request the server's schema accepts, its image a PNG."""
  import base64
  import io

  from PIL import Image

  from lladav_jax.serve.protocol import ChatRequest
  with open(os.path.join(ws, "curl_args"), "rb") as f:
    args = f.read().decode().split("\0")[:-1]
  assert args[0] == "-s" and args[1] == "http://127.0.0.1:8000/v1/chat/completions", args[:2]
  body = json.loads(args[args.index("-d") + 1])
  req = ChatRequest.model_validate(body)
  url = body["messages"][0]["content"][1]["image_url"]["url"]
  assert url.startswith("data:image/png;base64,")
  assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (56, 56)
  assert req.max_tokens == 64


# ----------------------------------------------------------------------------- the table

_RELEASED = "needs the released GSAI-ML/LLaDA-V weights (about 16 GiB) at /ckpt"
_STAGE = ("needs the previous stage's 8B checkpoint and the stage's dataset under data/ (sized for a GPU / TPU "
          "cluster)")
COMMANDS = [
    # the first lines: install and test
    Entry("venv", r"python3 -m venv \.venv$", skip="creates the virtual environment this test already runs in"),
    Entry("activate", r"\. \.venv/bin/activate$",
          skip="activates that environment (the commands run here have its interpreter first on PATH)"),
    Entry("pip requirements", r"pip install -r requirements(-test)?\.txt$", skip="installs from PyPI: the network"),
    Entry("pip editable", r"pip install -e \.$",
          skip="installs this checkout into the environment the test runs in (already installed)"),
    Entry("pytest", r"python -m pytest tests ", skip="the whole test suite, this test included"),
    # Training
    Entry("train demo", r"python -m lladav_jax\.train --config=configs/finetune\.py --workdir=runs/demo$",
          add="--config.train.num_steps=2 --config.eval.limit=4",
          why="600 steps and a 300-sample final eval are minutes: 2 steps and 4 samples", check=_trained),
    Entry("eval demo", r"python -m lladav_jax\.eval --checkpoint runs/demo/model --task demo ", add="--limit 4",
          why="4 of the 300 test questions", check=_evaluated),
    Entry("train demo recipe", r"python -m lladav_jax\.train --config=configs/finetune\.py:demo --workdir=runs/mine ",
          skip="needs your own VQA data and tokenizer (/data/...); tests/test_train_resume.py trains this recipe, "
               "the tower's pre-training included, on the demo's"),
    Entry("train finetune", r"python -m lladav_jax\.train --config=configs/finetune\.py:finetune ",
          skip="needs the released weights converted (/ckpt/lladav-orbax) and your LLaVA-format data"),
    Entry("eval own split", r"python -m lladav_jax\.eval --checkpoint /shared/runs/ft/model ",
          skip="needs the fine-tuned model of the command before and your held-out split"),
    Entry("stage 0", r"python -m lladav_jax\.convert hf-to-orbax (model/LLaDA-8B-Instruct|/ckpt/LLaDA-8B-Instruct) ",
          skip="needs the LLaDA-8B-Instruct and SigLIP2 weights (tests/test_stage0.py runs stage 0 on tiny stand-ins)"),
    Entry("stages 1-3",
          r"python -m lladav_jax\.train --config=configs/finetune\.py:(stage1|stage2_si|stage2_ov|stage3) ",
          skip=_STAGE),
    Entry("export stage 3", r"python -m lladav_jax\.convert orbax-to-hf exp/llada_v_vw/model exp/LLaDA-V-hf$",
          why="nothing added; the demo's exported model stands in for stage 3's (a trained model/ directory alike)",
          setup=_stage3_stand_in, check=_exported),
    # Converting weights
    Entry("convert released",
          r"python -m lladav_jax\.convert (hf-to-orbax /ckpt/LLaDA-V|orbax-to-hf /ckpt/lladav-orbax) ",
          skip=_RELEASED + " (tests/test_released_checkpoint.py converts a tiny checkpoint in its layout both ways)"),
    # Generating
    Entry("generate demo", r"python -m lladav_jax\.generate --checkpoint runs/demo/model ",
          why="nothing added (8 answer positions already)"),
    Entry("generate released", r"python -m lladav_jax\.generate --checkpoint /ckpt/lladav-orbax ",
          skip=_RELEASED + " converted, and a cat.jpg of yours"),
    # Serving
    Entry("serve", r"python -m lladav_jax\.serve runs/demo/model ",
          skip="a server that runs until stopped (tests/test_serve.py starts it on a tiny model and sends these "
               "requests)"),
    Entry("curl", r"curl -s http://127.0.0.1:8000/v1/chat/completions ",
          before="curl() { printf '%s\\0' \"$@\" > \"$PWD/curl_args\"; }",
          why="with curl a shell function that records its arguments (no server here): the body must be a "
              "request the server's schema accepts, with the demo picture", check=_request_body),
    # Evaluating
    Entry("eval benchmarks", r"python -m lladav_jax\.eval --checkpoint DIR --task (mmbench_en_dev|chartqa) ",
          skip="needs a benchmark's file (MMBench_DEV_EN.tsv, chartqa_test.jsonl) and a model (DIR)"),
]


# ----------------------------------------------------------------------------- reading the README

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


def code_blocks(text: str) -> list[tuple[int, str, list[str]]]:
  """(line number of the first line, language, lines) of every code block: fenced (language from the info string,
  "" without one), or indented by four spaces after a blank line ("indented")."""
  lines, out, i = text.splitlines(), [], 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if m:
      j = i + 1
      while j < len(lines) and not lines[j].strip().startswith(m.group(1)):
        j += 1
      out.append((i + 2, m.group(2).lower(), lines[i + 1:j]))
      i = j + 1
    elif lines[i].startswith(("    ", "\t")) and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
      j = i
      while j < len(lines) and (lines[j].startswith(("    ", "\t")) or not lines[j].strip()):
        j += 1
      block = [line[4:] if line.startswith("    ") else line[1:] for line in lines[i:j]]
      out.append((i + 1, "indented", block))
      i = j
    else:
      i += 1
  return out


def _strip_comment(line: str, quote: str | None) -> tuple[str, str | None]:
  """The line without its shell comment (a `#` starting a word outside quotes), and the quote still open after it."""
  k = 0
  while k < len(line):
    c = line[k]
    if quote == "'":
      quote = None if c == "'" else quote
    elif c == "\\":
      k += 1  # the next character is escaped (outside single quotes)
    elif quote == '"':
      quote = None if c == '"' else quote
    elif c in "'\"":
      quote = c
    elif c == "#" and (k == 0 or line[k - 1].isspace()):
      return line[:k].rstrip(), quote
    k += 1
  return line, quote


def _split_and(text: str) -> list[str]:
  """`a && b` as [a, b] (outside quotes)."""
  parts, cur, quote, k = [], "", None, 0
  while k < len(text):
    c = text[k]
    if quote is None and text.startswith("&&", k):
      parts.append(cur.strip())
      cur, k = "", k + 2
      continue
    if quote == "'":
      quote = None if c == "'" else quote
    elif c == "\\" and k + 1 < len(text):
      cur += c
      k += 1
      c = text[k]
    elif quote == '"':
      quote = None if c == '"' else quote
    elif c in "'\"":
      quote = c
    cur += c
    k += 1
  return [p for p in parts + [cur.strip()] if p]


def shell_commands(first_line: int, lines: list[str], console: bool = False) -> list[Command]:
  """The commands of a shell block: comment lines skipped, a command continued over lines ending in a backslash or
  inside an open quote, `&&` chains split; in a console block only the `$ ` lines (the rest is output)."""
  out, buf, start, quote = [], [], 0, None
  for k, line in enumerate(lines):
    if not buf:
      if console:
        if not line.startswith("$ "):
          continue
        line = line[2:]
      if not line.strip() or line.lstrip().startswith("#"):
        continue
      start = first_line + k
    code, quote = _strip_comment(line, quote)
    buf.append(code)
    if quote is None and not code.endswith("\\"):
      out += [Command(start, part) for part in _split_and("\n".join(buf))]
      buf = []
  assert not buf, f"README line {start}: a command that does not end (an open quote or a trailing backslash)"
  return out


def readme_commands(text: str) -> tuple[list[Command], list[str]]:
  """Every shell command of the README, and the code blocks of a language this test does not know."""
  commands, unknown = [], []
  for first, lang, lines in code_blocks(text):
    if lang in SHELL or lang == "indented":
      commands += shell_commands(first, lines, console=lang == "console")
    elif lang not in NOT_SHELL:
      unknown.append(f"README line {first - 1}: a code block of language {lang or '(none)'!r}")
  return commands, unknown


def classify(commands: list[Command]) -> dict[Command, Entry]:
  found, problems = {}, []
  for c in commands:
    hits = [e for e in COMMANDS if re.match(e.pattern, c.flat)]
    if len(hits) != 1:
      problems.append(f"README line {c.line}: {c.flat!r} matches {[e.name for e in hits] or 'no entry'}")
    else:
      found[c] = hits[0]
  assert not problems, ("every README shell command must be run or skipped with a reason in tests/test_readme.py's "
                        "COMMANDS:\n" + "\n".join(problems))
  return found


def _readme():
  with open(README, encoding="utf-8") as f:
    return f.read()


# ----------------------------------------------------------------------------- the tests

def test_every_readme_command_is_run_or_skipped_with_a_reason():
  commands, unknown = readme_commands(_readme())
  assert not unknown, "label each code block (```bash, ```python, ...) so that its commands are classified:\n" + \
      "\n".join(unknown)
  assert len(commands) >= 20, [c.flat for c in commands]  # the parser still sees the README's blocks
  found = classify(commands)
  used = {e.name for e in found.values()}
  stale = [e.name for e in COMMANDS if e.name not in used]
  assert not stale, f"entries no README command matches (drop them, or fix their pattern): {stale}"
  for e in COMMANDS:
    assert bool(e.skip) != bool(e.why), f"{e.name}: a skip reason or, run, why it runs as it does"


def test_the_parser_on_the_readmes_forms():
  text = "\n".join([
      "intro", "", "    a && b --x", "", "```bash", "# comment", "c --y \\", "    --z   # trailing", "d '{",
      "  \"k\": 1", "}' \"$(e \\", "  f)\"", "```", "```console", "$ g h", "output", "```", "```python", "print(1)",
      "```"])
  commands, unknown = readme_commands(text)
  assert [c.flat for c in commands] == ["a", "b --x", "c --y --z", "d '{ \"k\": 1 }' \"$(e f)\"", "g h"]
  assert [c.line for c in commands] == [3, 3, 7, 9, 15] and not unknown
  assert readme_commands("```\nls\n```")[1] == ["README line 1: a code block of language '(none)'"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
  """Every run entry's commands in the README's order in one fresh folder: {entry name: CompletedProcess}."""
  found = classify(readme_commands(_readme())[0])
  ws = str(tmp_path_factory.mktemp("readme"))
  os.symlink(os.path.join(REPO, "configs"), os.path.join(ws, "configs"))
  env = subprocess_env()
  env["HOME"] = os.path.join(ws, "home")  # the demo data and every ~ of the commands
  env["PATH"] = os.path.dirname(PYTHON) + os.pathsep + env["PATH"]
  env.pop("LLADAV_API_KEY", None)
  results, done = {}, set()
  for c, e in found.items():
    if e.skip or c.flat in done:  # the quick start repeats the demo's training
      continue
    done.add(c.flat)
    if e.setup:
      e.setup(ws)
    script = "\n".join(["set -eo pipefail", "shopt -s failglob", e.before, f"{c.text} {e.add}".strip()])
    t0, cpu0 = time.perf_counter(), _children_cpu()
    r = subprocess.run(["bash", "-c", script], cwd=ws, env=env, capture_output=True, text=True, timeout=400)
    r.seconds, r.cpu_seconds = time.perf_counter() - t0, _children_cpu() - cpu0
    print(f"README line {c.line} ({e.name}): exit {r.returncode}, {r.seconds:.1f}s, {r.cpu_seconds:.1f}s of CPU")
    results.setdefault(e.name, []).append((c, r))
  return ws, results


def _children_cpu() -> float:
  u = resource.getrusage(resource.RUSAGE_CHILDREN)
  return u.ru_utime + u.ru_stime


RUN = [e for e in COMMANDS if not e.skip]


@pytest.mark.parametrize("entry", RUN, ids=[e.name for e in RUN])
def test_readme_command_runs(ran, entry):
  ws, results = ran
  assert entry.name in results, f"{entry.name}: no README command ran"
  for c, r in results[entry.name]:
    out = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"README line {c.line}: {c.flat!r} exited {r.returncode} in {r.seconds:.0f}s:\n{out}"
    assert "Traceback" not in r.stderr, out
    if entry.check:
      entry.check(ws, r)
