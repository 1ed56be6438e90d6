"""workermon.testing, the pytest plugin for router authors: its fixtures and replay(), and the README's
"Testing your router" example run as a user would, in a separate pytest run in a temporary directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from workermon import EtcdOptions
from workermon.testing import Fleet, replay

from .helpers import SAMPLES

ROOT = Path(__file__).resolve().parents[1]


def test_fleet_and_monitor_fixtures(workermon_fleet: Fleet, workermon_monitor: Any) -> None:
    a = workermon_fleet.add(total_kv_blocks=100)
    b = workermon_fleet.add(total_kv_blocks=100, data_parallel_size=2)
    workermon_fleet.wait_until(workermon_monitor, lambda: workermon_monitor.members() == {a.worker_id, b.worker_id})
    a.report(95)
    workermon_fleet.wait_until(workermon_monitor, lambda: workermon_monitor.busy_workers() == {a.worker_id})
    b.report(95, dp_rank=0)
    b.report(95, dp_rank=1)
    workermon_fleet.wait_until(workermon_monitor, lambda: workermon_monitor.is_busy(b.worker_id))
    b.stop()
    workermon_fleet.wait_until(workermon_monitor, lambda: workermon_monitor.members() == {a.worker_id})
    a.kill()  # the card goes when its (2 s) lease expires
    workermon_fleet.wait_until(workermon_monitor, lambda: not workermon_monitor.members(), timeout=10)


def test_zmq_sim_worker_reports_are_never_lost(workermon_fleet: Fleet) -> None:
    # README-style, with no wait on the subscription in the test: each report must arrive
    # (before the fix, 25-80 % of such runs lost the first report).
    for _ in range(12):
        w = workermon_fleet.add(total_kv_blocks=100, event_plane="zmq")
        mon = workermon_fleet.monitor()
        mon.start()
        try:
            workermon_fleet.wait_until(mon, lambda: w.worker_id in mon.members())
            w.report(99)
            workermon_fleet.wait_until(mon, lambda: mon.is_busy(w.worker_id))
        finally:
            mon.stop()
        w.stop()


def test_zmq_report_without_a_monitor_says_why(workermon_fleet: Fleet) -> None:
    import pytest

    w = workermon_fleet.add(total_kv_blocks=100, event_plane="zmq")
    w.subscribe_timeout = 0.2
    with pytest.raises(AssertionError, match="no monitor subscribed"):
        w.report(1)


def test_replay_a_capture(workermon_fleet: Fleet) -> None:
    mon = workermon_fleet.monitor(etcd=EtcdOptions(card_prefix=f"v1/mdc/{workermon_fleet.namespace}/"))
    mon.start()
    try:
        assert mon.wait_ready(10)
        n = replay(mon, SAMPLES / "etcd-0.7.1.json", namespace=workermon_fleet.namespace)
        assert n > 0
        # Put without their recorded leases: the ids come from the keys' hex suffixes (= the leases).
        ids = {0x6A6CA21CC4F57E07, 0x6A6CA21CC4F57E0C}
        workermon_fleet.wait_until(mon, lambda: mon.members() == ids)
        sent = replay(workermon_fleet.servers, SAMPLES / "nats-0.7.1.jsonl", namespace=workermon_fleet.namespace)
        assert sent > 0
        workermon_fleet.wait_until(mon, lambda: mon.health().reducer.get("load_reports", 0) > 0)
    finally:
        mon.stop()


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- testing-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README has no 'Testing your router' example"
    return m.group(1)


@pytest.mark.integration
def test_readme_testing_example_runs_as_a_user_would(tmp_path: Path) -> None:
    (tmp_path / "test_my_router.py").write_text(_readme_example())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "passed" in res.stdout


@pytest.mark.integration
def test_plugin_changes_nothing_for_a_suite_that_does_not_ask(tmp_path: Path) -> None:
    (tmp_path / "test_plain.py").write_text(
        "import threading\n"
        "def test_nothing_started():\n"
        "    assert [t.name for t in threading.enumerate()] == ['MainThread']\n")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--fixtures", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "workermon_fleet" in res.stdout  # registered
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
