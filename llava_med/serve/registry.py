"""The controller's worker registry: who serves what, dispatch, heartbeats and expiry. Pure state, no I/O.

Every method is synchronous and guarded by one lock (never held across an ``await``); the controller
(:mod:`llava_med.serve.controller`) does the talking to workers and calls in here with what it verified.

Workers are keyed by their canonical URL (:func:`llava_med.serve.addresses.canonical_url`). A worker registered under
several addresses (``localhost``, ``127.0.0.1``, ...) reports the same instance id for each: the first address is its
entry, the others are aliases of it (a heartbeat under an alias keeps the entry alive; dispatch names the entry).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

from llava_med.constants import controller_heart_beat_expiration
from llava_med.errors import BadRequestError
from llava_med.serve.addresses import canonical_url
from llava_med.serve.protocol import WorkerStatus

__all__ = ["DISPATCH_METHODS", "DispatchMethod", "WorkerInfo", "WorkerRegistry"]

logger = logging.getLogger(__name__)

DISPATCH_METHODS = ("shortest_queue", "lottery")


class DispatchMethod:
    SHORTEST_QUEUE = "shortest_queue"
    LOTTERY = "lottery"


@dataclass
class WorkerInfo:
    """What the controller knows of one worker. ``last_heart_beat`` is the last time it proved alive (a heartbeat,
    or an answer to ``/worker_get_status`` for workers registered without heartbeats)."""

    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float
    instance_id: str | None = None


def _key(worker_name: str) -> str:
    """The registry key of an address (its canonical form; as given when it is not a valid URL)."""
    try:
        return canonical_url(worker_name)
    except BadRequestError:
        return worker_name.strip().rstrip("/")


class WorkerRegistry:
    """Registry and dispatch.

    Args:
        dispatch_method: ``shortest_queue`` (default) or ``lottery``.
        heart_beat_expiration: seconds after which a silent worker is dropped (default: constants / env).
        clock: monotonic clock, injectable for tests.
        rng: random source for ``lottery``, injectable for tests.
    """

    def __init__(self, dispatch_method: str = DispatchMethod.SHORTEST_QUEUE, *,
                 heart_beat_expiration: float | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        if dispatch_method not in DISPATCH_METHODS:
            raise ValueError(f"dispatch_method must be one of {DISPATCH_METHODS}, got {dispatch_method!r}")
        expiration = controller_heart_beat_expiration() if heart_beat_expiration is None else heart_beat_expiration
        if expiration <= 0:
            raise ValueError(f"heart_beat_expiration must be > 0 seconds, got {expiration}")
        self.dispatch_method = dispatch_method
        self.heart_beat_expiration = float(expiration)
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerInfo] = {}
        self._aliases: dict[str, str] = {}  # another address of a registered worker -> its entry

    # ------------------------------------------------------------------------------------------------ changes
    def add_worker(self, worker_name: str, check_heart_beat: bool, status: WorkerStatus) -> str:
        """Record a verified status; returns the entry it went to (an alias's entry for a known instance)."""
        worker_name = _key(worker_name)
        with self._lock:
            entry = self._entry_for(worker_name, status.instance_id)
            known = entry in self._workers
            self._workers[entry] = WorkerInfo(
                list(status.model_names), float(status.speed), int(status.queue_length),
                check_heart_beat or (known and self._workers[entry].check_heart_beat), self.clock(),
                status.instance_id,
            )
            if entry != worker_name:
                self._aliases[worker_name] = entry
        if entry != worker_name:
            logger.info("%s is another address of worker %s (same instance): kept as one entry", worker_name, entry)
        else:
            logger.info("%s worker %s: %s", "re-registered" if known else "registered", entry, status.model_dump())
        return entry

    def _entry_for(self, worker_name: str, instance_id: str | None) -> str:
        if instance_id is not None:
            for name, info in self._workers.items():
                if info.instance_id == instance_id:
                    return name
        if worker_name not in self._workers and worker_name in self._aliases:
            # A restarted worker at an address known as an alias: it becomes an entry of its own.
            del self._aliases[worker_name]
        return worker_name

    def remove_worker(self, worker_name: str) -> bool:
        worker_name = _key(worker_name)
        with self._lock:
            entry = self._aliases.get(worker_name, worker_name)
            removed = self._workers.pop(entry, None) is not None
            for alias in [a for a, e in self._aliases.items() if e == entry or a == worker_name]:
                del self._aliases[alias]
        if removed:
            logger.info("removed worker %s", entry)
        return removed

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        """A heartbeat (under a worker's address or an alias); False tells the worker to register again."""
        worker_name = _key(worker_name)
        with self._lock:
            info = self._workers.get(self._aliases.get(worker_name, worker_name))
            if info is not None:
                info.queue_length = queue_length
                info.last_heart_beat = self.clock()
        if info is None:
            logger.info("heartbeat from unknown worker %s: asking it to register", worker_name)
        return info is not None

    def touch(self, worker_name: str, status: WorkerStatus) -> None:
        """A worker answered ``/worker_get_status``: it is alive, and its models and queue are as it says."""
        with self._lock:
            info = self._workers.get(worker_name)
            if info is not None:
                info.model_names = list(status.model_names)
                info.speed = float(status.speed)
                info.queue_length = int(status.queue_length)
                info.last_heart_beat = self.clock()

    def remove_expired_workers(self) -> list[str]:
        """Drop the workers whose heartbeats stopped (workers without heartbeats are polled by the controller)."""
        deadline = self.clock() - self.heart_beat_expiration
        with self._lock:
            expired = [n for n, i in self._workers.items() if i.check_heart_beat and i.last_heart_beat < deadline]
        for name in expired:
            self.remove_worker(name)
            logger.warning("worker %s missed its heartbeats for %.1f s: removed", name, self.heart_beat_expiration)
        return expired

    def unmonitored_due(self) -> list[str]:
        """Workers without heartbeats (registered by hand, nested controllers) not heard from for half the
        expiration: the controller asks them for their status and drops those that do not answer."""
        deadline = self.clock() - self.heart_beat_expiration / 2
        with self._lock:
            return [n for n, i in self._workers.items() if not i.check_heart_beat and i.last_heart_beat < deadline]

    # ------------------------------------------------------------------------------------------------ reads
    def workers(self) -> dict[str, WorkerInfo]:
        """A snapshot of the registry."""
        with self._lock:
            return {name: replace(info, model_names=list(info.model_names)) for name, info in self._workers.items()}

    def aliases(self) -> dict[str, str]:
        with self._lock:
            return dict(self._aliases)

    def list_models(self) -> list[str]:
        with self._lock:
            models = {m for info in self._workers.values() for m in info.model_names}
        return sorted(models)

    def get_worker_address(self, model_name: str, exclude: Collection[str] = ()) -> str:
        """A worker serving ``model_name``, or ``""`` when none does. ``exclude``: instance ids to pass over (the
        controllers a relayed request already went through: sending it back there would loop)."""
        with self._lock:
            candidates = sorted(
                (name, info) for name, info in self._workers.items()
                if model_name in info.model_names and (info.instance_id is None or info.instance_id not in exclude)
            )
            if not candidates:
                return ""
            if self.dispatch_method == DispatchMethod.LOTTERY:
                weights = [max(info.speed, 0.0) for _, info in candidates]
                if sum(weights) <= 1e-4:
                    return ""
                name = self.rng.choices([n for n, _ in candidates], weights=weights, k=1)[0]
            else:
                def load(item: tuple[str, WorkerInfo]) -> tuple[float, str]:
                    name_, info = item
                    return (info.queue_length / info.speed if info.speed > 0 else float("inf"), name_)

                name, info = min(candidates, key=load)
                info.queue_length += 1  # as the original: count the request until the next heartbeat
        logger.debug("dispatch %s -> %s", model_name, name)
        return name
