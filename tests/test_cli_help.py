"""Every command line answers --help with its usage and exit status 0 (absl's own help exits 1: train.py
overrides it), its usage line showing the required arguments and its exit statuses; argument errors exit 2 as
argparse's do (generate, eval, serve, convert), before any checkpoint is read; train's flag errors exit 1 as absl's
do, with the usage line and one `error:` line naming the flag, never a traceback; convert's failures exit 1 with one
`error:` line."""
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from lladav_jax import generate
from tests.train_helpers import PYTHON, REPO, subprocess_env

# (command line, what its usage must show: the required arguments without brackets)
HELP = [
    (["lladav_jax.train", "--help"], ["usage: python -m lladav_jax.train", "--config=FILE[:PRESET]",
                                      "(--workdir=DIR | --print_config | --dry_run)", "--dry_run_meshes"]),
    (["lladav_jax.train", "-h"], ["usage: python -m lladav_jax.train"]),
    (["lladav_jax.convert", "--help"], ["usage: python -m lladav_jax.convert", "{hf-to-orbax,orbax-to-hf}"]),
    (["lladav_jax.convert", "hf-to-orbax", "--help"], ["usage: python -m lladav_jax.convert hf-to-orbax", "src dst"]),
    (["lladav_jax.convert", "orbax-to-hf", "--help"], ["usage: python -m lladav_jax.convert orbax-to-hf", "src dst"]),
    (["lladav_jax.generate", "--help"], ["usage: python -m lladav_jax.generate [-h] --checkpoint DIR",
                                         "--prompt PROMPT"]),
    (["lladav_jax.eval", "--help"], ["usage: python -m lladav_jax.eval [-h] --checkpoint CHECKPOINT --task"]),
    (["lladav_jax.serve", "--help"], ["usage: python -m lladav_jax.serve", "MODEL_DIR"]),
]


def _run(argv):
  return subprocess.run([PYTHON, "-m", *argv], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                        timeout=300)


@pytest.fixture(scope="module")
def helps():
  # imports only (jax and the package), a few seconds each: run side by side
  with ThreadPoolExecutor(4) as pool:
    return dict(zip((" ".join(a) for a, _ in HELP), pool.map(_run, [a for a, _ in HELP])))


@pytest.mark.parametrize("argv, shown", HELP, ids=[" ".join(a) for a, _ in HELP])
def test_help_exits_0_with_the_usage(helps, argv, shown):
  r = helps[" ".join(argv)]
  out = " ".join((r.stdout + r.stderr).split())  # argparse wraps long usage lines
  assert r.returncode == 0, out[-2000:]
  assert "usage" in out.lower()
  for s in shown:
    assert s in out, (s, out[:2000])
  if argv[-1] == "--help":
    assert "Exit status: 0" in out and ("2 a usage error" in out or "2 a bad config" in out), out[-2000:]


# train's flag errors (absl: exit status 1): (flags, what the one error line must say)
TRAIN_FLAG_ERRORS = [
    ([], "error: --config is required; --workdir must be set"),
    (["--config=configs/finetune.py", "--print_config", "--config.train.num_step=3"],
     "error: --config.train.num_step=3: the config has no field 'num_step' (Did you mean \"num_steps\""),
    (["--config=configs/absent.py", "--workdir=/tmp/x"],
     "error: flag --config=configs/absent.py: [Errno 2] No such file or directory: 'configs/absent.py'"),
    (["--config=configs/finetune.py:stage9", "--print_config"],
     "error: flag --config=configs/finetune.py:stage9: ValueError: unknown preset 'stage9'; presets: demo"),
]


@pytest.fixture(scope="module")
def train_flag_errors():
  with ThreadPoolExecutor(4) as pool:
    return list(pool.map(_run, [["lladav_jax.train", *a] for a, _ in TRAIN_FLAG_ERRORS]))


@pytest.mark.parametrize("case", range(len(TRAIN_FLAG_ERRORS)),
                         ids=[" ".join(a) or "no flags" for a, _ in TRAIN_FLAG_ERRORS])
def test_train_flag_errors_exit_1_with_the_usage_and_one_error_line(train_flag_errors, case):
  r, (argv, said) = train_flag_errors[case], TRAIN_FLAG_ERRORS[case]
  assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr and r.stdout == "", r.stderr[-3000:]
  assert "usage: python -m lladav_jax.train [--help] --config=FILE[:PRESET] (--workdir=DIR" in r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(said), (said, r.stderr[-3000:])


def test_convert_exit_statuses(capsys, tmp_path):
  from lladav_jax import convert
  for argv, named in [(["hf-to-orbax", str(tmp_path / "absent"), str(tmp_path / "out")], "src"),
                      (["orbax-to-hf", str(tmp_path), str(tmp_path / "out"), "--shard-size", "5XB"],
                       "argument --shard-size"),
                      (["hf-to-orbax", str(tmp_path), str(tmp_path / "out"), "--vision-tower", "absent"],
                       "--vision-tower")]:
    with pytest.raises(SystemExit) as e:
      convert.main(argv)
    assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert "usage:" in err and f"error: {named}" in err, (argv, err)
  # a failure the user can act on: one error line naming it, exit status 1, nothing written
  (tmp_path / "src").mkdir()
  (tmp_path / "dst").mkdir()
  assert convert.main(["orbax-to-hf", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "exists (pass overwrite=True / --overwrite" in err, err
  assert convert.main(["hf-to-orbax", str(tmp_path / "src"), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "config.json" in err and not (tmp_path / "out").exists(), err


def test_generate_needs_a_checkpoint_unless_given_a_model(capsys, tmp_path):
  with pytest.raises(SystemExit) as e:
    generate.main(["--prompt", "What is in the image?"])
  assert e.value.code == 2
  assert "the following arguments are required: --checkpoint" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    generate.main(["--checkpoint", str(tmp_path / "absent"), "--prompt", "hi"])
  assert e.value.code == 2
  assert f"--checkpoint '{tmp_path / 'absent'}': no such directory" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # the images are looked at before the checkpoint is read
    generate.main(["--checkpoint", str(tmp_path), "--image", "absent.png", "--prompt", "hi"])
  assert e.value.code == 2
  assert "--image 'absent.png': no such file" in capsys.readouterr().err
  # with a model object --checkpoint is optional: parsing gets as far as the images
  with pytest.raises(SystemExit) as e:
    generate.main(["--image", "absent.png", "--prompt", "hi"], model=object())
  assert e.value.code == 2


def test_eval_and_serve_argument_errors_exit_2_naming_the_argument(capsys, tmp_path):
  from lladav_jax.eval.__main__ import main as eval_main
  from lladav_jax.serve.__main__ import main as serve_main
  data = tmp_path / "test.json"
  data.write_text("[]")
  cases = [
      (eval_main, ["--checkpoint", str(tmp_path), "--task", "demo", "--data", str(tmp_path / "absent.json")],
       "--data"),
      (eval_main, ["--checkpoint", str(tmp_path / "absent"), "--task", "demo", "--data", str(data)], "--checkpoint"),
      (eval_main, ["--checkpoint", str(tmp_path), "--task", "llava_anls", "--data", str(data),
                   "--image_folder", str(tmp_path / "absent")], "--image_folder"),
      (serve_main, [str(tmp_path / "absent")], "MODEL_DIR"),
      (serve_main, [str(tmp_path), "--max-num-seqs", "0"], "--max-num-seqs 0: must be >= 1"),
      (serve_main, [str(tmp_path), "--image-root", str(tmp_path / "absent")], "--image-root"),
  ]
  for main, argv, named in cases:
    with pytest.raises(SystemExit) as e:
      main(argv)
    assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert named in err and "usage:" in err, (argv, err)
