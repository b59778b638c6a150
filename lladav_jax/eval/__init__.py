"""Evaluation: benchmark readers, the original's task settings, metrics, a CLI and an lmms-eval plugin.

    python -m lladav_jax.eval --checkpoint DIR --task chartqa --data chartqa_test.jsonl --limit 100

The package itself imports neither JAX nor the model; the CLI (__main__) and the plugin (lmms_plugin) do.
"""
from lladav_jax.eval.readers import DataFormatError, ReadResult, read_samples
from lladav_jax.eval.run import evaluate, evaluate_during_training, run_sweep
from lladav_jax.eval.sample import EvalSample
from lladav_jax.eval.tasks import TASKS, Task, get_task

__all__ = ["DataFormatError", "EvalSample", "ReadResult", "TASKS", "Task", "evaluate",
           "evaluate_during_training", "get_task", "read_samples", "run_sweep"]
