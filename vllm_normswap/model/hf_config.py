"""Hugging Face config class for model_type "normswap", so transformers/vLLM can read our config.json.

Registered with transformers' AutoConfig, together with the model class of hf_model.py, by
``register_transformers()``. Holds values only; validation happens once, in ``NormSwapArch`` (config.py), when
the model is built.
"""

from __future__ import annotations

import dataclasses
import os

from transformers import PretrainedConfig

from vllm_normswap.model.checkpoint_format import check_headers
from vllm_normswap.model.config import MODEL_TYPE, NormSwapArch

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(NormSwapArch) if f.default is not dataclasses.MISSING}
# defaults for required fields: a valid tiny shape, only used when transformers builds a bare config to diff against
_BARE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=256,
             max_position_embeddings=256)


class NormSwapConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        tie = kwargs.pop("tie_word_embeddings", _DEFAULTS["tie_word_embeddings"])
        for name, default in {**_BARE, **_DEFAULTS}.items():
            if name != "tie_word_embeddings":
                setattr(self, name, kwargs.pop(name, default))
        # vLLM reads these two directly from the HF config: resolve the "None = derive" defaults here
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__init__(tie_word_embeddings=tie, **kwargs)
        # a checkpoint directory being loaded (not a bare config): vLLM's API server reads its safetensors headers
        # next (dtype, tied-head probes) and a corrupt one would fail there without naming file or fix
        if self._name_or_path and os.path.isdir(self._name_or_path):
            check_headers(self._name_or_path)
