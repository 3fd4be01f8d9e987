"""int8 weight-only (W8A16) quantization: `--quantization normswap_int8`.

primitives.py     torch-only int8 math (quantize per channel / group / tensor, dequantize, SQNR, int32 packing)
config.py         the vLLM QuantizationConfig (online vs compressed-tensors checkpoint, which layers)
linear_method.py  the vLLM linear methods (create weights, quantize or unpack after loading, apply)
cpp_kernel.py     the compiled CPU kernel (csrc/int8_mm.cpp: 16-bit activations x int8 weights, three inner loops)
cpu_kernels.py    the pure-torch CPU paths: int8 tiles widened in cache into the dense GEMM, and torch's int8pack
cpu_plan.py       which path runs each layer shape and row-count bucket, measured on this machine against vLLM's
                  bf16 linear (`normswap int8-plan` prints it); plan_cache.py keeps it on disk per machine
cpu_dispatch.py   the per-call lookup of the plan (NORMSWAP_INT8_KERNEL forces a path for experiments)
cpu_op.py         the dispatch as the custom op torch.ops.normswap.int8_linear (opaque to torch.compile)
plan_cmd.py       `normswap int8-plan`
gpu_kernel.py     GPU: vLLM's mixed-precision kernel chooser (Machete/Marlin), untested without a GPU
"""

_registered = False


def register_quantization() -> None:
    """Register NormSwapInt8Config with vLLM under the name "normswap_int8". Idempotent; imports only the config
    module (the linear methods and kernels load when a model is built)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from vllm_normswap.quant.config import NAME, NormSwapInt8Config

    register_quantization_config(NAME)(NormSwapInt8Config)
    _registered = True
