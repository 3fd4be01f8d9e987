"""`normswap int8-plan`: the CPU int8 kernel plan (cpu_plan.py) for a model's linear shapes on this machine: from
the cache where measured before, else measured now. Prints a table, then the plan as JSON.

    normswap int8-plan --model CHECKPOINT_DIR [--threads 1,2] [--lm-head]
    normswap int8-plan --shapes 576x192,192x192 [--group-size 128] [--dtype bfloat16]

Each cell: the path chosen for that row-count bucket and how many times faster it ran than vLLM's own bf16
linear for the same shape (above 1: int8 is faster).
"""

from __future__ import annotations

import json
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a checkpoint dir: its config.json gives the linear shapes (Llama-style or "
                                     "NormSwap), its quantization_config the group size")
    src.add_argument("--shapes", help="comma-separated NxK weight shapes (out x in features), e.g. 11264x2048")
    p.add_argument("--threads", default=None,
                   help="comma-separated torch thread counts (default: this process's, torch.get_num_threads())")
    p.add_argument("--group-size", type=int, default=None, help="per-group scales of this size (default: per "
                                                                "channel, or the model's quantization_config)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="activation dtype (default: the model's, else "
                                                                 "bfloat16)")
    p.add_argument("--lm-head", action="store_true", help="include an untied LM head (quantized with "
                                                          "lm_head: true)")
    p.add_argument("--remeasure", action="store_true", help="measure again and overwrite the cached entries")


def model_shapes(cfg: dict, lm_head: bool) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of the linear layers of one decoder layer (vLLM fuses q/k/v and gate/up), plus the head."""
    d = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or d // heads
    f = cfg["intermediate_size"]
    shapes = {"qkv": ((heads + 2 * kv) * hd, d), "o": (d, heads * hd)}
    if cfg.get("ffn_act", "swiglu") == "swiglu":  # NormSwap's switch; Llama-style configs are gated
        shapes["gate_up"] = (2 * f, d)
    else:
        shapes["up"] = (f, d)
    shapes["down"] = (d, f)
    if lm_head and not cfg.get("tie_word_embeddings", False):
        shapes["lm_head"] = (cfg["vocab_size"], d)
    return shapes


def parse_shapes(text: str) -> dict[str, tuple[int, int]]:
    out = {}
    for item in text.split(","):
        try:
            n, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not NxK (e.g. 11264x2048)") from None
        out[f"{n}x{k}"] = (n, k)
    return out


def table(rows: list[tuple[str, object]]) -> str:
    from vllm_normswap.quant.cpu_plan import BUCKETS

    lines = ["| layer | N x K | groups | dtype | threads | " + " | ".join(f"M={b}" for b in BUCKETS) + " |",
             "|" + "---|" * (5 + len(BUCKETS))]
    for name, plan in rows:
        cells = []
        for i, kernel in enumerate(plan.kernels):
            ms, ref = plan.ms.get(kernel), plan.ms.get("vllm_bf16")
            cells.append(f"{kernel} {ref[i] / ms[i]:.2f}x" if ms and ref else kernel)
        lines.append(f"| {name} | {plan.n} x {plan.k} | {plan.groups} | {plan.dtype} | {plan.threads} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    import torch

    from vllm_normswap.quant import cpu_dispatch, cpu_plan

    group, dtype = args.group_size, args.dtype
    if args.model:
        cfg_path = Path(args.model) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"--model {args.model}: no config.json there")
        cfg = json.loads(cfg_path.read_text())
        shapes = model_shapes(cfg, args.lm_head)
        qc = cfg.get("quantization_config") or {}
        if group is None and qc.get("granularity") == "group":
            group = qc.get("group_size")
        dtype = dtype or cfg.get("torch_dtype") or "bfloat16"
    else:
        shapes = parse_shapes(args.shapes)
    dtype = getattr(torch, dtype or "bfloat16")
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    if cpu_dispatch.forced() is not None:
        print(f"note: {cpu_dispatch.ENV}={cpu_dispatch.forced()} forces that path in servers; the plan below is "
              f"what auto would run")
    for name, (n, k) in shapes.items():
        if group and k % group:
            raise SystemExit(f"--group-size {group} does not divide the input size {k} of {name}")
    specs = [(n, k, k // group if group else 1) for n, k in shapes.values()]
    rows = []
    for t in threads:  # a count other than this process's is measured in a fresh process (cpu_plan.measure_at)
        rows += zip(shapes, cpu_plan.plans_for(specs, dtype, t, remeasure=args.remeasure))
    print(table(rows))
    print()
    print(json.dumps({"buckets": list(cpu_plan.BUCKETS), "rows_timed": list(cpu_plan.ROWS),
                      "plan": [{"layer": name, **plan.row()} for name, plan in rows]}, indent=1))
    return 0
