"""What the registry says of one model: its state and a point-in-time entry.

Why apart: every consumer (the servicer, health, the status reporter, the CLI) reads
entries; only the registry writes them. Entries are frozen, so a reader on any thread
holds a consistent view without the registry's lock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from modelcache.config import ModelSpec
from modelcache.daemon.loader import LoadedModel


class ModelState(enum.Enum):
    PENDING = "pending"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    REMOVED = "removed"  # only ever heard by listeners: the entry is gone


@dataclass(frozen=True)
class ModelEntry:
    """A point-in-time view of one configured model, safe to hand to other threads.

    ``spec`` is what is served when READY, else what is being loaded. ``update`` is a
    changed spec being loaded (or failing to) while ``spec``'s weights keep serving.
    ``failures`` counts consecutive failed attempts at the wanted spec; ``next_retry``
    (time.time()) is when the next automatic attempt runs, None when none is scheduled.
    """

    spec: ModelSpec
    state: ModelState
    loaded: LoadedModel | None = None
    error: str = ""
    error_class: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    next_retry: float | None = None
    update: ModelSpec | None = None

    @property
    def wanted(self) -> ModelSpec:
        return self.update or self.spec


Listener = Callable[[str, ModelState], None]
