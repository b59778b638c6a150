"""lladav-jax: LLaDA-V (diffusion multimodal LLM) in JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy, so `import lladav_jax.data` etc. do not pull in the model stack.
  if name == "LLaDAV":
    from lladav_jax.api import LLaDAV
    return LLaDAV
  raise AttributeError(name)


__all__ = ["LLaDAV"]
