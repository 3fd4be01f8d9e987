"""`normswap ab --compare RUN_A RUN_B`: what changed between two report folders.

For every option both runs measured: the int8 ÷ bf16 ratios (throughput, TTFT p50, mean TPOT, end-to-end p50) with their labels,
int8's KL as a multiple of the precision floor, and the decision. A row "changed" when its label differs, or when
either run's value lies outside the other's CI. Printed as a table and written as compare.md / compare.json in
RUN_B.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_normswap.ab import family
from vllm_normswap.ab.loadstats import LATENCY_KEYS


def _load(run: str) -> dict:
    path = Path(run) / "results.json"
    if not path.is_file():
        raise SystemExit(f"--compare {run}: no results.json there; give two runs/<timestamp> folders of normswap ab")
    return json.loads(path.read_text())


def _outside(a: dict | None, b: dict | None) -> bool:
    """Either value outside the other's CI."""
    if not a or not b:
        return a is not b and bool(a or b)
    return not (a["lo"] <= b["value"] <= a["hi"]) or not (b["lo"] <= a["value"] <= b["hi"])


def _ci(s: dict | None) -> str:
    return "–" if not s else f"{s['value']:.3g} [{s['lo']:.3g}, {s['hi']:.3g}]"


def rows(a: dict, b: dict) -> list[dict]:
    out = []
    ca, cb = a.get("comparisons", {}), b.get("comparisons", {})
    for option in [o for o in ca if o in cb]:
        la, lb = ca[option].get("load") or {}, cb[option].get("load") or {}
        for key in LATENCY_KEYS:
            ra, rb = la.get(key), lb.get(key)
            lab_a, lab_b = (la.get("labels") or {}).get(key), (lb.get("labels") or {}).get(key)
            out.append({"option": option, "measure": f"int8÷bf16 {key}", "a": ra, "b": rb, "label_a": lab_a,
                        "label_b": lab_b, "changed": lab_a != lab_b or _outside(ra, rb)})
        ka, kb = ca[option].get("int8_kl_vs_floor"), cb[option].get("int8_kl_vs_floor")
        out.append({"option": option, "measure": "int8 KL ÷ precision floor", "a": ka, "b": kb, "label_a": None,
                    "label_b": None, "changed": _outside(ka, kb)})
    da, db = a["analysis"]["decision"], b["analysis"]["decision"]
    out.append({"option": "(all)", "measure": "decision", "a": None, "b": None,
                "label_a": f"{da['verdict']}: {da['choice']}", "label_b": f"{db['verdict']}: {db['choice']}",
                "changed": (da["verdict"], da["choice"]) != (db["verdict"], db["choice"])})
    return out


def _family_note(a: dict, b: dict) -> str:
    """Says when the two runs' load CIs carry different adjustments (a run from before ab/family.py: 95% each)."""
    fa, fb = family.of(a), family.of(b)
    if (fa or {}).get("method") == (fb or {}).get("method") and (fa or {}).get("size") == (fb or {}).get("size"):
        return ""
    say = [f"Holm over {f['size']} load ratios" if f else "95% each, unadjusted" for f in (fa, fb)]
    return f"Load CIs: A {say[0]}, B {say[1]}; labels compare across different adjustments.\n\n"


def compare_runs(run_a: str, run_b: str) -> int:
    a, b = _load(run_a), _load(run_b)
    table = rows(a, b)
    head = ["option", "measure", f"A {Path(run_a).name}", f"B {Path(run_b).name}", "label A", "label B", "changed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        lines.append("| " + " | ".join([r["option"], r["measure"], _ci(r["a"]), _ci(r["b"]), r["label_a"] or "–",
                                        r["label_b"] or "–", "**yes**" if r["changed"] else "no"]) + " |")
    n = sum(r["changed"] for r in table)
    text = f"# normswap ab --compare\n\nA = {run_a}, B = {run_b}: {n} of {len(table)} rows changed.\n\n" + \
        _family_note(a, b) + "\n".join(lines) + "\n"
    print(text)
    (Path(run_b) / "compare.md").write_text(text)
    (Path(run_b) / "compare.json").write_text(json.dumps({"a": str(run_a), "b": str(run_b), "changed": n,
                                                          "rows": table}, indent=1))
    return 0
