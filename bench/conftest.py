"""Prints every recorded comparison as one table at the end of a benchmark session."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _fmt(v):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:.3g}"


def render(rows: list[dict]) -> str:
    lines = ["| table | case | ours | value | baseline | value | ratio | goal | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| {table} | {case} | {ours} | {ov} {unit} | {base} | {bv} | {ratio} | {goal} | {note} |".format(
            ov=_fmt(r["ours_value"]), bv=_fmt(r["base_value"]),
            **{**r, "ratio": (_fmt(r["ratio"]) + "×") if r["ratio"] is not None else "-"}))
    return "\n".join(lines)


def pytest_sessionfinish(session, exitstatus):
    if not common.ROWS:
        return
    print("\n\n" + render(common.ROWS) + "\n", flush=True)
