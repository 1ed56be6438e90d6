"""gunicorn configuration: one WorkerMonitor per worker process, started after fork.

Threads do not survive ``fork()``, so a monitor created in the master (for
example with ``preload_app = True``) would look alive in each worker while
its threads are gone.  workermon refuses that (reads raise RuntimeError
naming this file); instead, each worker process starts its own monitor in
``post_fork`` and stops it in ``worker_exit``.

    gunicorn -c examples/gunicorn.conf.py examples.wsgi_app:app

The app reads the monitor with ``examples.wsgi_app.monitor()``.
"""

from __future__ import annotations

import os
from typing import Any

bind = os.environ.get("WORKERMON_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("WORKERMON_GUNICORN_WORKERS", "2"))
worker_class = "gthread"
threads = 4
preload_app = True   # safe: the monitor is only created after the fork


def post_fork(server: Any, worker: Any) -> None:
    from examples import wsgi_app

    wsgi_app.start_monitor()


def worker_exit(server: Any, worker: Any) -> None:
    from examples import wsgi_app

    wsgi_app.stop_monitor()
