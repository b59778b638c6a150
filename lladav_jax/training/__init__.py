"""Training: the masked-diffusion loss, optimizer groups, the sharded train step, checkpoints, metrics.

    loss.py           the original's ELBO (one t per sequence, 1/p weights, per-sample answer length),
                      chunked float32 LM-head cross-entropy
    optimizer.py      AdamW + warmup/cosine, parameter groups (vision / projector / llm), freezing
    state.py          the train-state pytree, its shardings and abstract twin; init (random/checkpoint)
    step.py           the jitted train step (gradient accumulation, non-finite guard), AOT compile
    checkpointing.py  orbax CheckpointManager: train state + grain iterator
    metrics.py        metrics.jsonl / TensorBoard / tqdm (process 0)
    flops.py          model FLOPs per step (bidirectional attention, vision tower), peak FLOP/s table
    synthetic.py      synthetic batches in the pipeline's format (tests, performance runs)
    settings.py       the typed run (frozen RunConfig, a dataclass a config section)
    run_config.py     ConfigDict -> RunConfig, `resolve` (validated once; errors name every bad field)
    trainer.py        the loop behind `python -m lladav_jax.train`
"""
