"""Data: tokenizer, chat template + labels, LLaVA records, the Grain pipeline, demo data.

    from lladav_jax.data.tokenizer import Tokenizer
    from lladav_jax.data.template import inference_prompt_ids, render_training, LabelConfig
    from lladav_jax.data.pipeline import build_train_iterator, build_eval_iterator, DataConfig
    from lladav_jax.data.demo_data import ensure_demo_data, demo_image_config, demo_data_config

(Nothing is imported here, so `import lladav_jax.data.tokenizer` stays light.)
"""
