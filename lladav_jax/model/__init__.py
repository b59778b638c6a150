"""Flax NNX modules: the LLaDA transformer, the SigLIP tower, and their LLaDA-V composition."""
from lladav_jax.model.build import abstract_model, init_sharded
from lladav_jax.model.lladav import LLaDAVModel, Projector
from lladav_jax.model.llm import LLaDA, KVCache
from lladav_jax.model.vision import SigLIPVision

__all__ = ["LLaDAVModel", "Projector", "LLaDA", "KVCache", "SigLIPVision", "abstract_model", "init_sharded"]
