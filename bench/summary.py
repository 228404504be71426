"""Render the rows a benchmark session recorded as a markdown table (for bench/RESULTS.md)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import render  # noqa: E402

if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out/rows.json")
    rows = json.loads(path.read_text()) if path.exists() else []
    cards = sorted({r["card"] for r in rows})
    print(f"card: {', '.join(cards) or '-'}; {len(rows)} rows\n")
    print(render(rows))
