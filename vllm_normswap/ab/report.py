"""Write runs/<timestamp>/: results.json, report.md and a self-contained report.html (PNG plots inlined)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from vllm_normswap.ab import analysis as analysis_mod
from vllm_normswap.ab import metrics, plots


def _fmt(x, spec=".4g"):
    return "–" if x is None else format(x, spec)


def _ci(s) -> str:
    return "–" if not s else f"{s['value']:.4g} [{s['lo']:.4g}, {s['hi']:.4g}]"


def tables(results: dict, an: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    key = f"rate_act_out_{an['tau']:g}"
    runs = [["name", "status", "startup s", "PPL [95% CI]", f"act_out >{an['tau']:g}", "tok/s", "TTFT p50/p99 ms",
             "ITL p50/p99 ms", "goodput req/s", "errors"]]
    for r in results["runs"]:
        ld, s = r.get("load") or {}, analysis_mod.option_stats(r) if r.get("observer") else {}
        runs.append([r["name"], r["status"] + (f": {r.get('error', '')[:80]}" if r["status"] == "failed" else ""),
                     _fmt(r.get("startup_s"), ".1f"), _ci((r.get("quality") or {}).get("ppl_a")),
                     _fmt(s.get(key), ".2e"), _fmt(ld.get("output_tokens_per_s"), ".1f"),
                     f"{_fmt(ld.get('ttft_ms', {}).get('p50'), '.0f')}/{_fmt(ld.get('ttft_ms', {}).get('p99'), '.0f')}",
                     f"{_fmt(ld.get('itl_ms', {}).get('p50'), '.0f')}/{_fmt(ld.get('itl_ms', {}).get('p99'), '.0f')}",
                     _fmt(ld.get("goodput_rps"), ".2f"), str(ld.get("errors", "–"))])
    comp = [["option", "ΔPPL int8−bf16", "KL", "top-1 agreement", "noise ΔPPL", "noise KL", "noise top-1"]]
    for o, c in results.get("comparisons", {}).items():
        a, n = c.get("int8_vs_bf16", {}), c.get("noise_floor", {})
        comp.append([o, _ci(a.get("delta_ppl")), _ci(a.get("kl")), _ci(a.get("top1_agreement")),
                     _ci(n.get("delta_ppl")), _ci(n.get("kl")), _ci(n.get("top1_agreement"))])
    probe = [["option", "c", "μ norm_in", "μ norm_out", f"act_out >{an['tau']:g}", "PPL"]]
    for o, pts in an["probe"].items():
        for p in pts:
            probe.append([o, f"{p['c']:g}", _fmt(p["mu_norm_in"]), _fmt(p["mu_norm_out"]),
                          _fmt(p["act_out_rate"], ".2e"), _fmt(p["ppl"])])
    for o, pts in an.get("probe_reference", {}).items():
        for p in pts:
            probe.append([o + " (reference)", f"{p['c']:g}", _fmt(p["mu_norm_in"]), _fmt(p["mu_norm_out"]),
                          _fmt(p["act_out_rate"], ".2e"), _fmt(p["ppl"])])
    return [(f"Server runs ({an['tau']:g} = outlier threshold)", runs[0], runs[1:]),
            ("Quality: int8 vs bf16 and the bf16 noise floor (95% bootstrap CIs over documents)", comp[0], comp[1:]),
            ("Mean-shift probe", probe[0], probe[1:])]


def _md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows])


def write(results: dict, run_dir) -> dict[str, Path]:
    run_dir = Path(run_dir)
    an = analysis_mod.analyze(results)
    results["analysis"] = {k: an[k] for k in ("tau", "stats", "probe", "probe_reference", "probe_agreement",
                                              "decision")}
    meta = results["meta"]
    tabs = tables(results, an)
    figs = {title: fn(results, an) for title, fn in plots.FIGURES.items()}
    dec = an["decision"]
    head = (f"normswap A/B report {meta['timestamp']}: {len(results['runs'])} server runs in {meta['wall_s']:.0f} s; "
            f"workload: {meta['workload']['documents']} held-out documents, {meta['workload']['prompts']} prompts "
            f"({meta['workload']['source']}, seed {meta['workload']['seed']}).")
    md = [f"# normswap A/B report\n\n{head}\n", "## Decision\n", *[f"- {line}" for line in dec["text"]], ""]
    for title, h, rows in tabs:
        md += [f"## {title}\n", _md_table(h, rows), ""]
    md += ["## Figures\n", "See report.html (figures inlined as PNG)."]
    (run_dir / "report.md").write_text("\n".join(md) + "\n")
    body = [f"<h1>normswap A/B report</h1><p>{html.escape(head)}</p>", "<h2 id='decision'>Decision</h2><ul>"]
    body += [f"<li>{html.escape(line)}</li>" for line in dec["text"]] + ["</ul>"]
    for title, h, rows in tabs:
        body.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in h)
                    + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                        for r in rows) + "</table>")
    for title, png in figs.items():
        body.append(f"<h2>{html.escape(title)}</h2>")
        body.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                    if png else "<p><em>no data for this figure (see failed runs)</em></p>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px} img{max-width:100%} li{margin:.4em 0}")
    (run_dir / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>normswap A/B"
                                         f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>")
    serial = dict(results)
    serial["runs"] = [{k: metrics.to_jsonable(v) if k in ("observer", "observer_load") else v for k, v in r.items()}
                      for r in results["runs"]]
    (run_dir / "results.json").write_text(json.dumps(serial, indent=1, default=str))
    return {"results": run_dir / "results.json", "report_md": run_dir / "report.md",
            "report_html": run_dir / "report.html"}
