"""Command line: answer a question about images, watching the answer being denoised.

    python -m lladav_jax.generate --checkpoint DIR --image cat.jpg --prompt "What is in the image?" \\
        [--gen_length 128 --block_length 32 --steps 128 --temperature 0 --remasking low_confidence \\
         --cfg_scale 0 --threshold T | --factor F --cache prefix|dual|dllm --refresh_interval 32 \\
         --prompt_interval 25 --gen_interval 7 --transfer_ratio 0.25 \\
         --schedule uniform|shift --shift 0.333 --stop STR ... --suffix STR --seed 0] [--json] \\
        [--trace trace.html] [--no_live]

On a terminal the denoising is replayed after generation: the sampler records the step at which
each answer position was committed (`commit_step`), and the view redraws the answer step by step
(masks as `░`, the tokens committed at the current step highlighted). `--trace FILE.html` writes a
self-contained page with a step slider and a step x position grid. `--json` prints the results as
JSON (no live view).

Exit status: 0 answered; 1 an error while loading or generating (its traceback); 2 a usage error (argparse: a
missing or unknown argument, a bad value, a checkpoint directory or image file that does not exist).
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import os
import shutil
import sys
import time
from typing import Sequence

from PIL import Image

from lladav_jax.api import LLaDAV
from lladav_jax.inference import SamplingParams
from lladav_jax.inference.text import token_pieces

MASK_GLYPH = "░"


def build_parser(checkpoint_required: bool = True) -> argparse.ArgumentParser:
  """`checkpoint_required=False` when the caller passes a model object instead (main(argv, model=...))."""
  p = argparse.ArgumentParser(prog="python -m lladav_jax.generate", description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n")[-1].strip())
  p.add_argument("--checkpoint", required=checkpoint_required, metavar="DIR",
                 help="Hugging Face LLaDA-V directory or converted Orbax directory")
  p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
  p.add_argument("--prompt", required=True, help="the user question (<image> tags are added if absent)")
  p.add_argument("--dtype", default=None,
                 help="parameter and compute dtype, e.g. float32 (default: the checkpoint's own parameter dtype)")
  d = SamplingParams()
  g = p.add_argument_group("sampling (SamplingParams; unset: its defaults)")
  g.add_argument("--gen_length", type=int, help=f"answer positions (default {d.gen_length})")
  g.add_argument("--block_length", type=int, help="default: gen_length")
  g.add_argument("--steps", type=int, help="denoising steps (default: gen_length)")
  g.add_argument("--temperature", type=float)
  g.add_argument("--remasking", choices=["low_confidence", "random"])
  g.add_argument("--cfg_scale", type=float)
  g.add_argument("--threshold", type=float, help="Fast-dLLM: commit every token with conf >= T")
  g.add_argument("--factor", type=float, help="Fast-dLLM: the factor rule (LLaDA-V's hook uses 1)")
  g.add_argument("--cache", choices=["prefix", "dual", "dllm"])
  g.add_argument("--refresh_interval", type=int, help=f"prefix / dual: full forwards every N steps (default {d.refresh_interval})")
  g.add_argument("--prompt_interval", type=int, help=f"dllm: prompt features refreshed every N steps (default {d.prompt_interval})")
  g.add_argument("--gen_interval", type=int, help=f"dllm: response features refreshed every N steps (default {d.gen_interval})")
  g.add_argument("--transfer_ratio", type=float, help=f"dllm: response share recomputed at other steps ({d.transfer_ratio})")
  g.add_argument("--schedule", choices=["uniform", "shift"])
  g.add_argument("--shift", type=float)
  g.add_argument("--stop", action="append", default=[], help="extra stop string (<|eot_id|> always stops)")
  g.add_argument("--suffix", help="fixed text after the answer positions")
  g.add_argument("--seed", type=int)
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  p.add_argument("--trace", default=None, metavar="FILE.html", help="save the denoising trajectory as HTML")
  p.add_argument("--no_live", action="store_true", help="no replay of the denoising on the terminal")
  p.add_argument("--fps", type=float, default=25.0, help="replay speed, frames per second")
  return p


def params_from_args(args: argparse.Namespace) -> SamplingParams:
  """The sampling flags that were given, onto SamplingParams (the rest keep its defaults)."""
  names = {f.name for f in dataclasses.fields(SamplingParams)}
  given = {k: v for k, v in vars(args).items() if k in names and v is not None}
  given["stop"] = tuple(args.stop)
  return SamplingParams(**given)


# ----------------------------------------------------------------------------- rendering

def frame_text(pieces, commit_step, mask_id_pos, t: int, color: bool, stop: int | None = None) -> str:
  """The answer after step t: committed tokens as text, masks as MASK_GLYPH."""
  out = []
  for k, (piece, cs) in enumerate(zip(pieces, commit_step)):
    if stop is not None and k >= stop:
      break
    if cs < 0 or cs > t or k in mask_id_pos:
      out.append(f"\x1b[2m{MASK_GLYPH}\x1b[0m" if color else MASK_GLYPH)
    elif cs == t and color:
      out.append(f"\x1b[1;32m{piece}\x1b[0m")
    else:
      out.append(piece)
  return "".join(out)


def _visible_lines(text: str, width: int) -> int:
  plain, skip = [], False
  for ch in text:  # drop ANSI escapes when measuring
    if ch == "\x1b":
      skip = True
    elif skip and ch == "m":
      skip = False
    elif not skip:
      plain.append(ch)
  return sum(max(1, math.ceil(len(line) / max(width, 1))) for line in "".join(plain).split("\n"))


def replay(result, tok, out=sys.stdout, fps: float = 25.0) -> None:
  """Redraws the answer after every step of `result.trajectory` with ANSI cursor movement."""
  traj = result.trajectory
  pieces = token_pieces(tok, traj.tokens)
  mask_pos = {k for k, i in enumerate(traj.tokens) if i == traj.mask_id}
  width = shutil.get_terminal_size((100, 20)).columns
  last = max(traj.commit_step + [0])
  prev_lines = 0
  for t in range(last + 1):
    text = f"step {t + 1}/{last + 1}\n" + frame_text(pieces, traj.commit_step, mask_pos, t, True)
    if prev_lines:
      out.write(f"\x1b[{prev_lines - 1}F\x1b[J" if prev_lines > 1 else "\r\x1b[J")
    out.write(text)
    out.flush()
    prev_lines = _visible_lines(text, width)
    time.sleep(1.0 / fps)
  out.write("\n")


def trace_html(prompt: str, result, tok, title: str = "LLaDA-V denoising trace") -> str:
  """A self-contained page: a step slider over the answer (tokens coloured by the step that
  committed them) and a step x position grid."""
  traj = result.trajectory
  pieces = token_pieces(tok, traj.tokens)
  data = {"pieces": pieces, "steps": traj.commit_step, "stop": traj.stop, "mask": traj.mask_id,
          "tokens": traj.tokens, "nfe": result.nfe, "answer": result.text}
  last = max(traj.commit_step + [0])
  rows = []
  for t in range(last + 1):
    cells = "".join(f'<td class="c" style="background:hsl({int(240 * t / max(last, 1))},70%,80%)" '
                    f'title="pos {k}">{html.escape(pieces[k])}</td>' if cs == t else "<td></td>"
                    for k, cs in enumerate(traj.commit_step))
    rows.append(f"<tr><th>{t}</th>{cells}</tr>")
  head = "".join(f"<th>{k}</th>" for k in range(len(pieces)))
  return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:sans-serif;margin:1.5em}} #ans span{{padding:1px 0;border-radius:3px;white-space:pre-wrap}}
.m{{color:#bbb}} table{{border-collapse:collapse;font-size:11px}} td,th{{border:1px solid #eee;padding:1px 3px}}
.cut{{opacity:.35}} #ans{{font-size:18px;line-height:1.8;max-width:60em}}
</style></head><body>
<h3>{html.escape(title)}</h3>
<p><b>Prompt:</b> {html.escape(prompt)}</p>
<p><b>Answer:</b> {html.escape(result.text)} <small>(NFE {result.nfe}, {result.steps} steps)</small></p>
<p>step <input id="s" type="range" min="0" max="{last}" value="{last}" style="width:40em">
<span id="sv"></span></p>
<div id="ans"></div>
<h4>Committed tokens per step (rows) and answer position (columns)</h4>
<table><tr><th>step</th>{head}</tr>{''.join(rows)}</table>
<script>
const D = {json.dumps(data)};
const last = {last};
function draw(t) {{
  document.getElementById('sv').textContent = (t + 1) + ' / ' + (last + 1);
  const el = document.getElementById('ans'); el.innerHTML = '';
  D.pieces.forEach((p, k) => {{
    const s = document.createElement('span'); const c = D.steps[k];
    if (c < 0 || c > t || D.tokens[k] === D.mask) {{ s.textContent = '\u2591'; s.className = 'm'; }}
    else {{ s.textContent = p; s.style.background = 'hsl(' + Math.round(240 * c / Math.max(last, 1)) + ',70%,80%)';
           s.title = 'pos ' + k + ', step ' + c; if (k >= D.stop) s.className = 'cut'; }}
    el.appendChild(s);
  }});
}}
document.getElementById('s').addEventListener('input', e => draw(+e.target.value));
draw(last);
</script></body></html>
"""


# ----------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None, model=None, out=None):
  """Runs the CLI. `model` (an LLaDAV) replaces --checkpoint (tests, notebooks)."""
  out = out or sys.stdout
  parser = build_parser(checkpoint_required=model is None)
  args = parser.parse_args(argv)
  # before the checkpoint is read (minutes for the released model), with argparse's usage and exit status 2
  for path in args.image:
    if not os.path.isfile(path):
      parser.error(f"--image {path!r}: no such file")
  if model is None:
    if not os.path.isdir(args.checkpoint):
      parser.error(f"--checkpoint {args.checkpoint!r}: no such directory")
    print(f"loading the model from {args.checkpoint}", file=sys.stderr, flush=True)
    model = LLaDAV.from_pretrained(args.checkpoint, dtype=args.dtype)
  imgs = [Image.open(p) for p in args.image]
  live = not args.json and not args.no_live and hasattr(out, "isatty") and out.isatty()
  params = params_from_args(args)
  print(f"generating {params.gen_length} answer positions, at most {params.steps} denoising steps (the engine "
        "compiles first)", file=sys.stderr, flush=True)
  res = model.generate([args.prompt], [imgs], params, return_trajectory=True)[0]
  if args.trace:
    with open(args.trace, "w", encoding="utf-8") as f:
      f.write(trace_html(args.prompt, res, model.tokenizer))
  if args.json:
    t = res.trajectory
    out.write(json.dumps({"prompt": args.prompt, "images": args.image, "text": res.text, "token_ids": res.token_ids,
                          "nfe": res.nfe, "steps": res.steps, "commit_step": t.commit_step,
                          "answer_positions": t.tokens, "stop": t.stop}) + "\n")
  else:
    if live:
      replay(res, model.tokenizer, out, args.fps)
    out.write(res.text + "\n")
    if live:
      out.write(f"\x1b[2m(NFE {res.nfe}, {res.steps} steps)\x1b[0m\n")
  return res


if __name__ == "__main__":
  main()
