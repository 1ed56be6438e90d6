"""A plain script: register callbacks, start the monitor, print every change.

    python examples/callbacks.py --etcd http://127.0.0.1:2379 --nats nats://127.0.0.1:4222 --duration 30
"""

from __future__ import annotations

import argparse
import threading

from workermon import BusyChange, WorkerMonitor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--etcd", action="append", default=None)
    parser.add_argument("--nats", action="append", default=None)
    parser.add_argument("--namespace", default="dynamo")
    parser.add_argument("--busy-threshold", type=float, default=0.9)
    parser.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument("--stop-after-changes", type=int, default=None)
    args = parser.parse_args(argv)

    kwargs = {}
    if args.etcd:
        kwargs["etcd_endpoints"] = args.etcd
    if args.nats:
        kwargs["nats_servers"] = args.nats
    monitor = WorkerMonitor(namespace=args.namespace, busy_threshold=args.busy_threshold, **kwargs)
    done = threading.Event()
    seen = 0

    @monitor.on_busy_change
    def report(change: BusyChange) -> None:
        # Runs on the monitor's reducer thread: keep it short.
        nonlocal seen
        seen += 1
        for wid in sorted(change.became_busy):
            print(f"busy {wid:x}", flush=True)
        for wid in sorted(change.became_free):
            print(f"free {wid:x}", flush=True)
        for wid in sorted(change.removed):
            print(f"gone {wid:x}", flush=True)
        if args.stop_after_changes is not None and seen >= args.stop_after_changes:
            done.set()

    with monitor:
        if not monitor.wait_ready(10):
            print("not ready: is etcd/NATS reachable?", flush=True)
            return 1
        print(f"ready: {len(monitor.members())} workers, {len(monitor.busy_workers())} busy", flush=True)
        try:
            done.wait(args.duration)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
