"""Loaded by scripts/as_avx2.sh's .pth file in every Python process of the venv: once torch.cpu is imported,
its CPU-feature queries answer as an AVX2-only CPU would. vLLM asks these (not torch's capability) when it picks
its native library (_C_AVX2 / _C_AVX512 / _C) and its attention ISA.

A meta-path hook, not an eager ``import torch``: processes that never import torch stay as light as they are.
"""

import importlib.abc
import importlib.util
import sys

NOT_ON_AVX2 = ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported", "_is_amx_tile_supported",
               "_is_amx_fp16_supported")


class _TorchCpuAsAvx2(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.cpu":
            return None
        sys.meta_path.remove(self)  # find the real spec; this hook is done after torch.cpu
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            for query in NOT_ON_AVX2:
                setattr(module, query, lambda: False)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _TorchCpuAsAvx2())
