"""Print the compatibility table (README) from the interop suite's results file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict


def main(path: str) -> int:
    latest: Dict[str, dict] = {}
    p = Path(path)
    if not p.exists():
        print(f"no results at {path}")
        return 1
    for line in p.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[row.get("label", row["release"])] = row
    print("| release | format | members & totals | last published values | frontend rejects ⇒ all busy | overload answer "
          "| free ⇒ frontend accepts | SIGKILL → removed after | run |")
    print("|---|---|---|---|---|---|---|---|---|")
    def order(label: str) -> tuple:
        release, _, mode = label.partition(" ")
        return tuple(int(x) for x in release.split(".")), mode

    for rel in sorted(latest, key=order):
        r = latest[rel]
        ok = lambda b: "✅" if b else "❌"  # noqa: E731
        kill = f"✅ {r['kill_removed']} s" if r["kill_removed"] else "❌"
        status = r.get("overload_status") or ("503" if order(rel)[0] < (1, 3) else "529")
        print(f"| {rel} | {r['format'] or '?'} | {ok(r['members'] and r['totals'])} | {ok(r['last_values'])} | "
              f"{ok(r['agrees_503'])} | {status} | {ok(r['agrees_free'])} | {kill} | {r['time']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".dynamo-venvs/results.jsonl"))
