"""Checkpoints: Hugging Face LLaDA-V / LLaDA safetensors and converted Orbax directories.

    names.py        the name table (MAPPING), layout transforms, extras, file names
    hf_config.py    config.json / lladav_config.json -> ModelConfig; a checkpoint's dtype
    hf_read.py      safetensors headers and tensors, streamed straight onto the mesh
    verify.py       a checkpoint against a config: the HF plan, named mismatch errors
    orbax_io.py     converted Orbax directories: metadata, restore, one parameter
    write.py        save_model (a loadable model directory), our parameters as HF tensors
    merge.py        merge_lora: LoRA adapters folded into their weights (every export)
    load.py         load_state (either format onto the mesh), init_params
    assemble.py     stage 0: an LLM directory + a SigLIP directory read as one LLaDA-V source
"""
from lladav_jax.weights.assemble import AssembledTensors, siglip_vision_config
from lladav_jax.weights.hf_config import (DEFAULT_MASK_TOKEN_ID, checkpoint_dtype, lladav_hf_config,
                                          load_model_config, model_config_from_hf)
from lladav_jax.weights.hf_read import SafetensorsDir, common_dtype, read_param
from lladav_jax.weights.load import init_params, load_state
from lladav_jax.weights.merge import merge_lora
from lladav_jax.weights.names import (CONFIG_FILE, ENTRIES, IMAGE_CONFIG_FILE, EXTRAS_FILE, GROUPS, INDEX_FILE, MANIFEST_FILE, MAPPING,
                                      PARAMS_DIR, TRANSFORMS, VISION_PREFIX, Entry, aux_files, expected_hf_shapes,
                                      flat_params, hf_shape, is_extra, nest, to_hf, to_ours)
from lladav_jax.weights.orbax_io import is_orbax_dir, orbax_metadata, read_manifest, read_orbax_param
from lladav_jax.weights.verify import CheckpointMismatchError, ParamSource, Plan, plan_hf
from lladav_jax.weights.write import save_model

__all__ = [
    "MAPPING", "Entry", "ENTRIES", "TRANSFORMS", "GROUPS", "VISION_PREFIX", "CheckpointMismatchError", "Plan",
    "ParamSource", "SafetensorsDir", "model_config_from_hf", "load_model_config", "checkpoint_dtype", "load_state", "plan_hf",
    "read_param", "is_extra", "is_orbax_dir", "orbax_metadata", "read_orbax_param", "read_manifest", "init_params",
    "expected_hf_shapes", "hf_shape", "to_ours", "to_hf", "flat_params", "nest", "common_dtype",
    "aux_files", "save_model", "merge_lora", "CONFIG_FILE", "IMAGE_CONFIG_FILE", "MANIFEST_FILE", "EXTRAS_FILE", "PARAMS_DIR", "INDEX_FILE",
    "DEFAULT_MASK_TOKEN_ID", "AssembledTensors", "siglip_vision_config", "lladav_hf_config",
]
