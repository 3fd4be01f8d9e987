"""bench_int8.py's results as result files of benchmarks/README.md (rendered there by render_readme.py): one run
(``--save``) and the ``--sweep`` table."""

from __future__ import annotations

import time

from machine import bind_cpus


def _tok_s(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


E2E_INT8 = {"normswap_int8": ("int8_over_bf16", "int8 / bf16"),
            "normswap_int8_lm_head": ("int8_lm_head_over_bf16", "int8 + `lm_head: true` / bf16")}


def e2e_table(result: dict, cpu: dict | None) -> dict:
    """One run (not --sweep) as a benchmarks/README.md result file: bf16 tok/s, then each int8 configuration's
    ratios (its tok/s in brackets), with the batch-1 bytes ceiling beside them."""
    batches, b = result["batches"], result["bf16"]
    measures = [f"decode_tok_s_batch{n}" for n in batches] + ["prefill_tok_s_512"]
    rows = [["bf16 tok/s", *(_tok_s(b[m]) for m in measures), f"{b['weight_bytes'] / 1e9:.3f} GB", "-"]]
    for mode, (key, label) in E2E_INT8.items():
        if mode in result:
            q, r = result[mode], result[key]
            rows.append([label, *(f"{q[m] / b[m]:.2f}x ({_tok_s(q[m])})" for m in measures),
                         f"{r['weight_bytes']:.2f}x", f"{r['decode_batch1_ceiling']:.2f}x"])
    n = 0 if cpu is None else len(bind_cpus(result["threads_bind"]))
    threads = "GPU" if cpu is None else f"{n} thread{'s' if n > 1 else ''}"
    m = result["model"]
    return {"title": f"int8 vs bf16 end to end, {cpu['kind'] if cpu else result['device']}, "
                     f"{'compiled' if result['compiled'] else 'eager'}, {threads}",
            "benchmark": f"benchmarks/bench_int8.py ({m['params'] / 1e9:.1f}B-parameter Llama shape, dummy weights, "
                         f"{'compiled' if result['compiled'] else 'eager'}, best of {result['rounds']}, "
                         f"--threads-bind {result['threads_bind']})",
            "machine": f"{cpu['cores']}-core {cpu['model']}" if cpu else result["device"],
            "cpu_flags": " ".join(cpu["flags"]) if cpu else "-",
            "date": time.strftime("%Y-%m-%d"),
            "notes": "decode tok/s at each batch size and prefill tok/s of one 512-token prompt. b1 ceiling: the ratio "
                     "of bytes a decode step reads, the most int8 gains at batch 1 where both read at the memory's "
                     "speed.",
            "columns": ["", *(f"decode b{n}" for n in batches), "prefill 512", "weights", "b1 ceiling"],
            "rows": rows}


def plan_note(plans: dict) -> str:
    """The plans in one sentence for the README table's notes."""
    from vllm_normswap.quant.cpu_plan import BUCKETS

    parts = []
    for t, rows in plans.items():
        cells = [f"{r['layer']} {'/'.join(r['buckets'].values())}" for r in rows if r["buckets"]]
        parts.append(f"{t} thr: " + (", ".join(cells) or "not in the plan cache"))
    return (f"int8 kernel plan (kernel per row bucket {' | '.join(BUCKETS)}, measured by the workers; result file "
            f"key int8_plan): " + "; ".join(parts) + ".")


def readme_table(result: dict) -> dict:
    """The sweep as a benchmarks/README.md result file: per thread count, bf16 and llama.cpp tok/s, then each int8
    configuration's ratios to them (its tok/s in brackets)."""
    cpu = result["cpu"]
    measures = list(dict.fromkeys(r["measure"] for r in result["table"]))
    rows = []
    for t in dict.fromkeys(r["threads"] for r in result["table"]):
        cells = {r["measure"]: r for r in result["table"] if r["threads"] == t}
        peer = any("llama_cpp_tok_s" in c for c in cells.values())
        rows.append([f"{t} thr: bf16 tok/s"] + [_tok_s(cells[m]["bf16_tok_s"]) for m in measures])
        if peer:
            rows.append([f"{t} thr: llama.cpp Q8_0 tok/s"] + [_tok_s(cells[m]["llama_cpp_tok_s"])
                                                              if "llama_cpp_tok_s" in cells[m] else "-"
                                                              for m in measures])
        for label in result["weight_ratio"]:  # the sweep's int8 configurations
            rows.append([f"{t} thr: {label} / bf16"] + [
                f"{cells[m][label]['over_bf16']:.2f}x ({_tok_s(cells[m][label]['tok_s'])})" for m in measures])
            if peer:
                rows.append([f"{t} thr: {label} / llama.cpp"] + [
                    f"{cells[m][label]['over_llama_cpp']:.2f}x" if "over_llama_cpp" in cells[m][label] else "-"
                    for m in measures])
    ratios = ", ".join(f"{label} {r:.2f}x" for label, r in result["weight_ratio"].items())
    ceiling = ", ".join(f"{label} {r:.2f}x" for label, r in result.get("batch1_ceiling", {}).items())
    return {"title": f"int8 vs bf16 vs llama.cpp, every batch size, {cpu['kind']}, "
                     f"{'compiled' if result['compiled'] else 'eager'} ({result['date']})",
            "benchmark": f"benchmarks/bench_int8.py --sweep ({result['model']['params'] / 1e9:.1f}B-parameter Llama "
                         f"shape, dummy weights, "
                         f"{'compiled' if result['compiled'] else 'eager'}, best of {result['rounds']})",
            "machine": f"{cpu['cores']}-core {cpu['model']}, worker threads bound to cores 0..N-1",
            "cpu_flags": " ".join(cpu["flags"]),
            "date": result["date"],
            "notes": f"decode tok/s at each batch size and prefill tok/s of one 512-token prompt. {result['peer']}. "
                     f"Weight bytes against bf16's: {ratios}." + (
                         f" Where both read at the memory's speed (batch 1), int8 / bf16 is at most the ratio of the "
                         f"bytes a decode step reads: {ceiling}." if ceiling else "") + (
                         f" {plan_note(result['int8_plan'])}" if result.get("int8_plan") else ""),
            "columns": [""] + measures, "rows": rows, "int8_plan": result.get("int8_plan")}
