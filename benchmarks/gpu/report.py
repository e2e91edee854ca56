"""``gpu_validate.md``: the markdown summary of ``gpu_validate.jsonl`` (stdlib only: the parent writes it, also
after a worker crash or when the budget runs out).

Sections: the run (budget, time, complete or cut short), facts, one overview table (records per status and
per group), then per group its records, failures first: a pass/fail table for the checks, a metrics table for
the timing groups.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUMMARY = "gpu_validate.md"
ORDER = {"error": 0, "fail": 1, "skip": 2, "ok": 3}
TABLE_GROUPS = ("attention_timing", "ctc_timing", "sweep", "registers", "profile_split")
HIDDEN = ("compiled_variants",)  # merged by the registers group


def _cell(value: Any, limit: int = 160) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"))
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(header: list[str], rows: list[list[Any]], limit: int = 160) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v, limit) for v in row) + " |" for row in rows]
    return lines


def _first_error_line(text: str | None) -> str:
    """The line that says what went wrong: a traceback's last line, or a worker's own first line."""
    if not text:
        return ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith("worker "):
        return lines[0]
    return lines[-1] if lines else ""


def _compact(metrics: dict[str, Any], limit: int = 8) -> str:
    """The shape first, then seqfast / torch error ratios, then the rest."""
    items = [(k, v) for k, v in metrics.items() if not isinstance(v, (dict, list))]
    items.sort(key=lambda kv: 0 if kv[0] == "shape" else 1 if kv[0].endswith("_ratio") else 2)
    return ", ".join(f"{k}={_cell(v, 40)}" for k, v in items[:limit])


def _shown(rec: dict) -> bool:
    """Per-group tables leave out the bookkeeping: variant inventories, and workers that ended cleanly (the
    overview has those)."""
    return rec["name"] not in HIDDEN and not (rec["name"].startswith("worker") and rec["status"] == "ok")


def _facts(records: list[dict]) -> list[str]:
    lines = ["## Facts", ""]
    for rec in records:
        if rec["group"] != "facts" or not _shown(rec) or rec["name"].startswith("worker"):
            continue
        if rec["name"].startswith("torch SDPA backends"):
            continue
        lines.append(f"**{rec['name']}** ({rec['status']})" + (f": {_first_error_line(rec.get('error'))}"
                                                                 if rec.get("error") else ""))
        lines += [f"- {k}: {_cell(v, 200)}" for k, v in rec.get("metrics", {}).items()]
        lines.append("")
    sdpa = [r for r in records if r["group"] == "facts" and r["name"].startswith("torch SDPA backends")]
    if sdpa:
        cols = ["flash", "cudnn", "efficient", "math"]
        lines += ["torch SDPA backends (causal fwd+bwd, B2 H4 L512):", ""]
        lines += _table(["case"] + cols, [[r["name"].replace("torch SDPA backends ", "")]
                                          + [r.get("metrics", {}).get(c) for c in cols] for r in sdpa], 90)
        lines.append("")
    return lines


def _overview(records: list[dict], groups: list[str]) -> list[str]:
    rows = []
    for g in groups:
        recs = [r for r in records if r["group"] == g and r["name"] not in HIDDEN]
        count = {s: sum(r["status"] == s for r in recs if r["name"] != "worker") for s in ORDER}
        workers = [r for r in recs if r["name"].startswith("worker")]
        wall = max((r.get("seconds") or 0 for r in workers), default=None)
        worker_state = "; ".join(sorted({r["status"] if r["status"] == "ok" else _first_error_line(r.get("error"))
                                         for r in workers})) or "not run"
        rows.append([g, count["ok"], count["fail"], count["error"], count["skip"], wall, worker_state])
    return ["## Overview", ""] + _table(["group", "ok", "fail", "error", "skip", "seconds", "worker"], rows) + [""]


def _group_section(group: str, recs: list[dict]) -> list[str]:
    recs = sorted(recs, key=lambda r: ORDER.get(r["status"], 9))
    lines = [f"## {group}", ""]
    if group in TABLE_GROUPS:
        keys: list[str] = []
        for r in recs:
            if not _shown(r) or r["name"].startswith("worker"):
                continue
            for k, v in r.get("metrics", {}).items():
                if k not in keys and not isinstance(v, (dict, list)) and k != "timer":
                    keys.append(k)
        keys = keys[:16]
        rows = [[r["name"], r["status"]] + [r.get("metrics", {}).get(k) for k in keys]
                + [_first_error_line(r.get("error"))] for r in recs if _shown(r)]
        lines += _table(["case", "status"] + keys + ["error"], rows, 70)
        timers = sorted({r.get("metrics", {}).get("timer") for r in recs} - {None})
        if timers:
            lines += ["", "Timer: " + "; ".join(timers)]
        for r in recs:  # nested metrics (profiler splits) as their own small tables
            for k, v in r.get("metrics", {}).items():
                if isinstance(v, list) and v and isinstance(v[0], dict):
                    cols = list(v[0])
                    lines += ["", f"{r['name']}: {k}", ""] + _table(cols, [[row.get(c) for c in cols] for row in v])
    else:
        rows = [[r["name"], r["status"], r.get("seconds"), _compact(r.get("metrics", {})),
                 _first_error_line(r.get("error"))] for r in recs if _shown(r)]
        lines += _table(["check", "status", "s", "metrics", "error"], rows, 220)
    lines.append("")
    return lines


def write_summary(out_dir: str | Path, records: list[dict], groups: list[str], run: dict[str, Any]) -> Path:
    """Write ``out_dir/gpu_validate.md`` from the records; ``run`` describes the run (budget, state, ...)."""
    lines = ["# seqfast GPU validation", ""]
    lines += [f"- {k}: {_cell(v, 300)}" for k, v in run.items()]
    lines += ["", "Rule: in float16 / bfloat16, seqfast's max error against float64 must be at most 2x torch's own "
              "error (same dtype, same inputs) plus a 1e-6 floor relative to max |reference|; float32 within "
              "~1e-5 of max |reference| (the *_err metrics are relative to max |reference|).", ""]
    lines += _facts(records)
    lines += _overview(records, groups)
    for g in groups:
        recs = [r for r in records if r["group"] == g]
        if g != "facts" and recs:
            lines += _group_section(g, recs)
    path = Path(out_dir) / SUMMARY
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
