"""A pytest JUnit XML report as JSON: one entry per test (standard library only, like gpu_check.py, which
converts each pytest step's report with it)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path


def junit_to_json(xml_path: Path) -> dict:
    """One entry per test: outcome (passed | failed | error | skipped), duration, message and the lines the test
    printed (the KL figures). A report that is missing (pytest killed) or unreadable says so."""
    if not xml_path.exists():
        return {"error": f"no pytest report at {xml_path.name} (pytest did not finish)", "tests": [], "counts": {}}
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        return {"error": f"unreadable pytest report: {err}", "tests": [], "counts": {}}
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("error", "failure", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = el.get("message") or (el.text or "").strip()[:2000]
                break
        printed = []
        for el in case.findall("system-out"):
            printed += [line for line in (el.text or "").splitlines() if line.strip() and not line.startswith("---")]
        tests.append({"name": case.get("name"), "classname": case.get("classname"),
                      "outcome": outcome, "duration_s": round(float(case.get("time") or 0), 3),
                      "message": message, "printed": printed})
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"tests": tests, "counts": counts}
