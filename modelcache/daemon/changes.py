"""What a new configuration changes for a running daemon: pure, so every rule is unit-tested.

A model is matched across configurations by its name (what clients ask for):

- added: a name only the new configuration has — it is loaded;
- removed: a name only the old one has — it stops admitting, drains and is freed;
- changed: the same name with any other field different (source, revision, dtype, device,
  max_length, pooling, ...), or every model when ``model_root`` changes (it decides where
  sources resolve) — the new spec is loaded while the old weights keep serving, then swapped;
- unchanged: everything else — not touched (same weights, no load).

``batching`` and ``log_level`` apply to every model at once, without any load.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelcache.config import DaemonConfig, ModelSpec


@dataclass(frozen=True)
class ConfigChanges:
    added: tuple[ModelSpec, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[ModelSpec, ...] = ()  # the new specs
    unchanged: tuple[str, ...] = ()
    batching: bool = False
    log_level: bool = False

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.batching or self.log_level)

    def summary(self) -> str:
        parts = [
            f"{label} {', '.join(names)}"
            for label, names in (
                ("added", [m.name for m in self.added]),
                ("removed", list(self.removed)),
                ("changed", [m.name for m in self.changed]),
            )
            if names
        ]
        if self.batching:
            parts.append("batching")
        if self.log_level:
            parts.append("log level")
        return "; ".join(parts) or "nothing"


def diff(old: DaemonConfig, new: DaemonConfig) -> ConfigChanges:
    before = {m.name: m for m in old.models}
    after = {m.name: m for m in new.models}
    root_moved = old.model_root != new.model_root
    return ConfigChanges(
        added=tuple(m for n, m in after.items() if n not in before),
        removed=tuple(n for n in before if n not in after),
        changed=tuple(
            m for n, m in after.items() if n in before and (root_moved or before[n] != m)
        ),
        unchanged=tuple(
            n for n, m in after.items() if n in before and not root_moved and before[n] == m
        ),
        batching=old.batching != new.batching,
        log_level=old.log_level != new.log_level,
    )


def describe_update(old: ModelSpec, new: ModelSpec) -> str:
    """What a changed model's update changes, e.g. ``revision 1a2b3c4 -> 5d6e7f8``."""
    parts = []
    for field in ModelSpec.model_fields:
        a, b = getattr(old, field), getattr(new, field)
        if a != b:
            if field == "revision":
                a, b = (a or "")[:7] or "none", (b or "")[:7] or "none"
            parts.append(f"{field} {a} -> {b}")
    return ", ".join(parts) or "model_root moved"
