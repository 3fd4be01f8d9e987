"""What the GPU machine is, as JSON on stdout: two steps of benchmarks/gpu_check.sh.

    python benchmarks/gpu_probe.py gpu-info     # nvidia-smi's view of the GPUs (standard library only)
    python benchmarks/gpu_probe.py versions     # torch / CUDA / vLLM / kernel choice (the GPU environment's python)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys


GPU_FIELDS = ("index", "name", "uuid", "driver_version", "memory.total", "memory.used", "compute_cap",
              "clocks.max.sm", "clocks.max.memory", "power.limit", "pcie.link.gen.max", "mig.mode.current",
              "temperature.gpu")
GPU_FIELDS_BASIC = ("index", "name", "driver_version", "memory.total")  # older drivers lack some of the above


def gpu_info() -> dict:
    def query(fields):
        try:
            proc = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}",
                                   "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise SystemExit("nvidia-smi not found: no NVIDIA driver on this machine") from None
        if proc.returncode:
            return None
        return [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in proc.stdout.splitlines()
                if line.strip()]

    gpus = query(GPU_FIELDS) or query(GPU_FIELDS_BASIC)
    if gpus is None:
        raise SystemExit("nvidia-smi --query-gpu failed")
    header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {"gpus": gpus, "count": len(gpus), "driver_version": gpus[0].get("driver_version"),
            "driver_cuda_version": cuda.group(1) if cuda else None, "cpu_count": os.cpu_count()}


def versions() -> dict:
    """The installed stack, what torch sees, and which vLLM kernel normswap_int8's GPU path will get."""
    import platform

    import torch
    import vllm

    import vllm_normswap

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "vllm": vllm.__version__, "vllm_normswap": vllm_normswap.__version__,
            "vllm_normswap_file": vllm_normswap.__file__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    device_count=torch.cuda.device_count())
    try:
        from vllm.platforms import current_platform

        info["vllm_platform"] = current_platform.device_type
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
        from vllm.scalar_type import scalar_types

        chosen = {}
        for label, group in (("channel", -1), ("group64", 64), ("group128", 128)):
            cfg = MPLinearLayerConfig(full_weight_shape=(2048, 2048), partition_weight_shape=(2048, 2048),
                                      weight_type=scalar_types.uint8b128, act_type=torch.bfloat16,
                                      group_size=group, zero_points=False)
            try:
                chosen[label] = choose_mp_linear_kernel(cfg).__name__
            except Exception as err:  # noqa: BLE001  (no kernel fits: that is the finding)
                chosen[label] = f"none: {err}"
        info["int8_kernel_2048x2048"] = chosen
    except Exception as err:  # noqa: BLE001
        info["kernel_query_error"] = repr(err)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("gpu-info", "versions"))
    a = ap.parse_args(argv)
    print(json.dumps(gpu_info() if a.what == "gpu-info" else versions(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
