"""workermon: which Dynamo workers are busy, for synchronous Python routers."""

from __future__ import annotations

import logging

from ._base import Snapshot
from ._config import MonitorConfig
from ._health import Health, SourceHealth
from ._kvhash import block_hashes
from ._tokens import TokenizerUnavailable, load_tokenizer
from ._model import BusyChange, Explanation, PickState, RankExplanation, Thresholds, WorkerLoadState
from ._monitor import CallbackHandle, WorkerMonitor
from ._picker import Reservation
from ._publisher import WorkerPublisher
from ._shared import AgentUnavailable, SharedMonitor
from .options import TLS, EtcdOptions, KvOptions, Limits, NatsOptions, Reconnect

__all__ = [
    "AgentUnavailable",
    "BusyChange",
    "CallbackHandle",
    "EtcdOptions",
    "Explanation",
    "KvOptions",
    "Health",
    "Limits",
    "MonitorConfig",
    "NatsOptions",
    "PickState",
    "RankExplanation",
    "Reconnect",
    "Reservation",
    "SharedMonitor",
    "Snapshot",
    "SourceHealth",
    "TLS",
    "Thresholds",
    "TokenizerUnavailable",
    "WorkerLoadState",
    "WorkerMonitor",
    "WorkerPublisher",
    "__version__",
    "block_hashes",
    "load_tokenizer",
]

__version__ = "0.2.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
