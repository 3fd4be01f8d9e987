"""int8 weight-only (W8A16) quantization: `--quantization normswap_int8`.

primitives.py  torch-only int8 math (quantize per channel / group / tensor, dequantize, SQNR, int32 packing)
config.py      the vLLM QuantizationConfig (online vs compressed-tensors checkpoint, which layers)
linear_method.py  the vLLM linear methods (create weights, quantize or unpack after loading, apply)
cpu_kernel.py  CPU matmul custom op (Numba GEMV at batch 1 on one thread, int8pack for decode, block-dequantized
               GEMM for prefill)
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
