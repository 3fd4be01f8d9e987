"""vllm-normswap: a vLLM plugin for the pre-FFN norm / FFN activation A/B.

vLLM calls :func:`register` (entry point ``vllm.general_plugins``) in every process it starts: the API server,
EngineCore, each worker. Contract: idempotent, cheap, imports nothing heavy (no torch, no vLLM model code);
model and quantization classes are registered by name and imported by vLLM only when used.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register NormSwapForCausalLM, its config class (and the transformers classes), the ``normswap_int8``
    quantization method and the /metrics bridge for worker-side outlier counters. Safe to call any number of
    times."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm import ModelRegistry

    if "NormSwapForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("NormSwapForCausalLM", "vllm_normswap.model.vllm_model:NormSwapForCausalLM")

    register_transformers()  # the API server reads config.json through AutoConfig

    from vllm_normswap.observe import register_metrics_bridge
    from vllm_normswap.quant import register_quantization

    register_quantization()
    register_metrics_bridge()

    from vllm_normswap.runtime import engine_fork, exit_code

    engine_fork.install()  # NORMSWAP_FORK_ENGINE=1: EngineCore and the worker are forked, not spawned
    exit_code.install_if_api_server()  # vLLM 0.32 exits 0 when its engine dies; make that exit 1 (API server only)


def register_transformers() -> None:
    """Register NormSwapConfig and the transformers NormSwapForCausalLM (model/hf_model.py) with AutoConfig and
    AutoModelForCausalLM, for ``model_type: normswap`` without trust_remote_code. For transformers users (lm-eval's
    ``hf`` backend, Trainer scripts); vLLM's processes get it from :func:`register`. A call, not an import side
    effect of this package: it imports torch and transformers' modeling code, which the ``normswap`` CLI does not
    need. Importing ``vllm_normswap.model.hf_model`` registers too. Idempotent."""
    from vllm_normswap.model import hf_model

    hf_model.register_transformers()
