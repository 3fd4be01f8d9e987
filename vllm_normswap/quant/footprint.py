"""Read back what normswap_int8 left in a loaded vLLM model (for tests and benchmarks, via LLM.apply_model:
a module-level function so vLLM can ship it to its worker processes by reference)."""

from __future__ import annotations

import torch

_METHODS = ("OnlineInt8LinearMethod", "CheckpointInt8LinearMethod", "Int8LMHeadMethod")


def int8_state(model: torch.nn.Module) -> dict:
    """{"layers": {module name: (int8 weight, scale)}, "param_bytes": resident bytes of all parameters and
    buffers, "int8_layers": count (linear layers and an int8 LM head), "linear_layers": count of vLLM linear layers,
    "kernel": None on CPU; on GPU the vLLM kernel class(es), and "layers" holds `weight_packed` and `weight_scale`
    as that kernel repacked them (on CPU tensors): not quantize()'s layout, but two loads that agree there hold the
    same int8 weights and scales}."""
    from vllm.model_executor.layers.linear import LinearBase

    layers, linear, kernels = {}, 0, set()
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            linear += 1
        method = getattr(module, "quant_method", None)
        if type(method).__name__ not in _METHODS:
            continue
        if getattr(method, "gpu_kernel", None) is not None:
            kernels.add(type(method.gpu_kernel).__name__)
            layers[name] = (module.weight_packed.detach().cpu(), module.weight_scale.detach().cpu())
        elif module.weight.dtype == torch.int8:  # an LM head tied to the embeddings stays bf16
            layers[name] = (module.weight.detach().clone(), module.weight_scale.detach().clone())
    return {"layers": layers, "param_bytes": weight_bytes(model), "int8_layers": len(layers),
            "linear_layers": linear, "kernel": ", ".join(sorted(kernels)) or None}


def weight_bytes(model: torch.nn.Module) -> int:
    """Resident bytes of parameters + persistent buffers (each storage counted once: tied weights share one),
    plus the bf16/fp16 weights that vLLM's CPU GEMM dispatch moved out of the module: on CPUs with native bf16
    dot products (AVX512-BF16, AMX) it prepacks an unquantized linear layer's weight into a oneDNN or SGL
    buffer and leaves an empty `weight`; those count at their unpacked size, output x input x dtype size."""
    from vllm.model_executor.layers.linear import LinearBase

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.device.type != "meta" else 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, LinearBase) and hasattr(module, "cpu_linear") and weight is not None \
                and weight.numel() == 0:
            rows = getattr(module, "output_size_per_partition", module.output_size)
            cols = getattr(module, "input_size_per_partition", module.input_size)
            total += rows * cols * weight.element_size()
    return total


def save_int8_state(model: torch.nn.Module, path: str) -> str:
    """torch.save(int8_state(model)) to `path.rank<TP rank>` (apply_model's return channel turns tensors into
    lists); returns the file written."""
    from vllm.distributed import get_tensor_model_parallel_rank

    out = f"{path}.rank{get_tensor_model_parallel_rank()}"
    torch.save(int8_state(model), out)
    return out
