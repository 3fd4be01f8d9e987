"""Write runs/<timestamp>/: results.json, report.md, figures/*.png and a self-contained report.html (PNG plots
inlined). A figure that fails is named in the report; everything else is still written."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from vllm_normswap.atomic import write_text_atomic
from vllm_normswap.ab import analysis as analysis_mod
from vllm_normswap.ab import auth, family, plots, record
from vllm_normswap.ab.loadstats import LATENCY_KEYS
from vllm_normswap.ab import premise


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
    comp = [["option", "ΔPPL int8−bf16", "KL(bf16‖int8)", "top-1 agreement", "floor KL(fp32‖bf16)",
             "int8 KL ÷ floor", "floor ΔPPL bf16−fp32"]]
    noise = any(c.get("noise_floor") for c in results.get("comparisons", {}).values())
    if noise:
        comp[0] += ["bf16-vs-itself KL"]
    for o, c in results.get("comparisons", {}).items():
        a, f = c.get("int8_vs_bf16", {}), c.get("precision_floor", {})
        row = [o, _ci(a.get("delta_ppl")), _ci(a.get("kl")), _ci(a.get("top1_agreement")),
               _ci(f.get("kl")) if f else "skipped: " + str(c.get("precision_floor_skipped", "–"))[:60],
               _ci(c.get("int8_kl_vs_floor")), _ci(f.get("delta_ppl"))]
        comp.append(row + ([_ci(c.get("noise_floor", {}).get("kl"))] if noise else []))
    load = [["option", "tok/s int8÷bf16", "TTFT p50 int8÷bf16", "TPOT mean int8÷bf16", "E2E p50 int8÷bf16",
             "rounds", "bf16 tok/s per round", "int8 tok/s per round"]]
    for o, c in results.get("comparisons", {}).items():
        ld = c.get("load")
        if not ld:
            continue
        per = ld["per_round_tokens_per_s"]
        load.append([o] + [family.cell(ld, k) for k in LATENCY_KEYS]
                    + [f"{ld['rounds']['a']}/{ld['rounds']['b']}", ", ".join(_fmt(x, ".0f") for x in per["a"]),
                       ", ".join(_fmt(x, ".0f") for x in per["b"])])
    resolution = family.resolution_table(results.get("comparisons", {}))
    timing = results["meta"].get("timing", {})
    split = [["phase", "seconds", "share"]]
    for k in ("startup", "warmup", "quality", "load", "probe", "attribution", "other", "total"):
        if k in timing:
            split.append([k, f"{timing[k]:.0f}", f"{100 * timing[k] / max(timing['total'], 1e-9):.0f}%"])
    warm = [["server", "warm-up s", "rounds", "settled", "median ms per output token, per round"]]
    for r in results["runs"]:
        w = r.get("warmup")
        if w:
            warm.append([r["name"], f"{w['seconds']:.1f}", str(w["rounds"]), str(w["settled"]),
                         ", ".join(f"{x:.1f}" for x in w["median_step_ms"])])
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
            ("Quality: int8 vs bf16 against the precision floor (fp32 reference vs bf16 server; 95% paired bootstrap "
             "CIs over documents)", comp[0], comp[1:]),
            (family.describe(family.of(results)), load[0], load[1:]),
            *([resolution] if resolution else []),
            ("Mean-shift probe", probe[0], probe[1:]),
            *premise.tables(an),
            ("Where the time went", split[0], split[1:]),
            ("Warm-up (excluded from every statistic)", warm[0], warm[1:])]


def _md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows])


def figures(results: dict, an: dict) -> tuple[dict[str, bytes | None], dict[str, str]]:
    """Each figure as PNG bytes (None: no data), also written to figures/<n>.png by ``write``; a figure that raises
    is named in the second dict with its error, and the report goes on without it."""
    figs, errors = {}, {}
    for title, fn in plots.FIGURES.items():
        try:
            figs[title] = fn(results, an)
        except Exception as e:  # one broken figure must not cost the report (or the run's data)
            figs[title] = None
            errors[title] = f"{type(e).__name__}: {e}"[:300]
    return figs, errors


def write(results: dict, run_dir) -> dict[str, Path]:
    run_dir = Path(run_dir)
    an = analysis_mod.analyze(results)
    results["analysis"] = {k: an[k] for k in ("tau", "stats", "probe", "probe_reference", "probe_agreement",
                                              "decision", *premise.KEYS)}
    meta = results["meta"]
    tabs = tables(results, an)
    figs, fig_errors = figures(results, an)
    results["analysis"]["figure_errors"] = fig_errors
    (run_dir / "figures").mkdir(exist_ok=True)
    for i, (title, png) in enumerate(figs.items()):
        if png:
            (run_dir / "figures" / f"{i + 1}-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')[:60]}.png"
             ).write_bytes(png)
    dec = an["decision"]
    t = meta.get("timing", {})
    head = (f"normswap A/B report {meta['timestamp']}: {len(results['runs'])} server runs in {meta['wall_s']:.0f} s "
            f"({100 * (t.get('measuring_fraction') or 0):.0f}% of it measuring); "
            f"workload: {meta['workload']['documents']} held-out documents, {meta['workload']['prompts']} prompts "
            f"({meta['workload']['source']}, seed {meta['workload']['seed']}).") + family.aa_note(meta)
    md = [f"# normswap A/B report\n\n{head}\n", "## Decision\n", *[f"- {line}" for line in dec["text"]], ""]
    for title, h, rows in tabs:
        md += [f"## {title}\n", _md_table(h, rows), ""]
    md += ["## Figures\n", "See report.html (figures inlined as PNG) and figures/*.png."]
    md += [f"- **figure failed: {title}** ({err}); the data are in results.json" for title, err in fig_errors.items()]
    write_text_atomic(run_dir / "report.md", auth.redact_text("\n".join(md) + "\n"))
    body = [f"<h1>normswap A/B report</h1><p>{html.escape(head)}</p>", "<h2 id='decision'>Decision</h2><ul>"]
    body += [f"<li>{html.escape(line)}</li>" for line in dec["text"]] + ["</ul>"]
    for title, h, rows in tabs:
        body.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in h)
                    + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                        for r in rows) + "</table>")
    for title, png in figs.items():
        body.append(f"<h2>{html.escape(title)}</h2>")
        if title in fig_errors:
            body.append(f"<p><em>this figure failed: {html.escape(fig_errors[title])}; the other figures and the "
                        f"tables are complete, the data are in results.json</em></p>")
        else:
            body.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,"
                        f"{base64.b64encode(png).decode()}'>" if png
                        else "<p><em>no data for this figure (see failed runs)</em></p>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px} img{max-width:100%} li{margin:.4em 0}")
    write_text_atomic(run_dir / "report.html", auth.redact_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>normswap A/B</title><style>{style}</style></head>"
        f"<body>{''.join(body)}</body></html>"))
    record.save(run_dir, results)
    return {"results": run_dir / "results.json", "report_md": run_dir / "report.md",
            "report_html": run_dir / "report.html"}
