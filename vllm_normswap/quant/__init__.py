"""int8 weight-only (W8A16) quantization: `--quantization normswap_int8`.

primitives.py  torch-only int8 math (quantize per channel / group / tensor, dequantize, SQNR, int32 packing)
config.py      the vLLM QuantizationConfig (online vs compressed-tensors checkpoint, which layers)
linear_method.py  the vLLM linear methods (create weights, quantize or unpack after loading, apply)
cpu_kernels.py   the CPU int8 matmul kernels (Numba GEMV and small-batch kernels, int8pack, block-dequantized GEMM)
cpu_dispatch.py  which kernel runs a matmul (batch size, dtype, threads; thresholds overridable by environment)
cpu_op.py        the dispatch as the custom op torch.ops.normswap.int8_linear (opaque to torch.compile)
gpu_kernel.py  GPU: vLLM's mixed-precision kernel chooser (Machete/Marlin), untested without a GPU
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
