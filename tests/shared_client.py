"""A SharedMonitor client process for the agent tests (driven over stdin/stdout, one JSON line each).

    python -m tests.shared_client SOCKET

Commands on stdin: ``state`` (prints version, busy, members), ``wait VERSION``
(prints the state once the version is at least that), ``reserve N`` (books N,
holds them, prints the worker ids), ``release`` (releases what it holds),
``quit``.
"""

from __future__ import annotations

import json
import sys

from workermon import SharedMonitor


def main() -> int:
    mon = SharedMonitor(sys.argv[1]).start()
    held = []
    try:
        if not mon.wait_ready(20):
            print(json.dumps({"error": "not ready"}), flush=True)
            return 1
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd, *rest = line.split()
            if cmd in ("state", "wait"):
                if cmd == "wait":
                    target = int(rest[0])
                    mon.wait_for(lambda: mon.version >= target, 20)
                print(json.dumps({"version": mon.version, "busy": sorted(mon.busy_workers()),
                                  "members": sorted(mon.members())}), flush=True)
            elif cmd == "reserve":
                got = [mon.reserve() for _ in range(int(rest[0]))]
                held += [r for r in got if r is not None]
                print(json.dumps({"workers": [r.worker_id if r else None for r in got]}), flush=True)
            elif cmd == "release":
                for r in held:
                    r.release()
                held.clear()
                print(json.dumps({"released": True}), flush=True)
            elif cmd == "quit":
                break
    finally:
        mon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
