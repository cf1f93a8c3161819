"""Platform properties: normalising an action's, and matching them against workers'. Pure.

Each supported property has a rule (NativeLink's names):
    exact     the worker must offer the same value
    minimum   numeric; the worker's value must be >= the action's
    priority  informational: accepted, not matched
    ignore    accepted and dropped
An action's *queue key* is its sorted exact and minimum properties; actions with equal keys
share a platform queue, so dispatch cost depends on the number of distinct keys, never on how
many actions wait in queues no worker can serve.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from reexec.errors import FailedPrecondition, InvalidArgument, Violation

Rule = Literal["exact", "minimum", "priority", "ignore"]
QueueKey = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class PropertyModifier:
    """One rewrite applied to every action's properties before queueing."""

    kind: Literal["add", "remove", "replace"]
    name: str
    value: str = ""


def apply_modifiers(
    props: Sequence[tuple[str, str]], modifiers: Sequence[PropertyModifier]
) -> list[tuple[str, str]]:
    out = list(props)
    for m in modifiers:
        if m.kind == "remove":
            out = [p for p in out if p[0] != m.name]
        elif m.kind == "replace":
            if any(p[0] == m.name for p in out):
                out = [p for p in out if p[0] != m.name] + [(m.name, m.value)]
        else:  # add: only when the action does not set it
            if not any(p[0] == m.name for p in out):
                out.append((m.name, m.value))
    return out


def queue_key(
    props: Iterable[tuple[str, str]],
    rules: Mapping[str, Rule],
    modifiers: Sequence[PropertyModifier] = (),
) -> QueueKey:
    """The normalised key of an action's platform, or FAILED_PRECONDITION naming the property."""
    key: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in apply_modifiers(list(props), modifiers):
        rule = rules.get(name)
        if rule is None:
            supported = ", ".join(sorted(rules)) or "none"
            raise FailedPrecondition(
                f"platform property {name!r} is not supported by this scheduler (supported: {supported})",
                [
                    Violation(
                        "UNSUPPORTED_PROPERTY", name, f"platform property {name!r} is not supported"
                    )
                ],
            )
        if name in seen and rule in ("minimum",):
            raise InvalidArgument(f"platform property {name!r} is given more than once")
        seen.add(name)
        if rule == "minimum":
            if not _is_int(value):
                raise InvalidArgument(
                    f"platform property {name!r} must be a whole number (it is a minimum), got {value!r}"
                )
            key.append((name, str(int(value))))
        elif rule == "exact":
            key.append((name, value))
    return tuple(sorted(set(key)))


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


WorkerProperties = Mapping[str, frozenset[str]]


def worker_properties(props: Iterable[tuple[str, str]]) -> dict[str, frozenset[str]]:
    """A worker's offer: each name may carry several values (e.g. two pools)."""
    out: dict[str, set[str]] = {}
    for name, value in props:
        out.setdefault(name, set()).add(value)
    return {k: frozenset(v) for k, v in out.items()}


def matches(key: QueueKey, worker: WorkerProperties, rules: Mapping[str, Rule]) -> bool:
    for name, value in key:
        offered = worker.get(name)
        if not offered:
            return False
        if rules.get(name) == "minimum":
            best = max((int(v) for v in offered if _is_int(v)), default=None)
            if best is None or best < int(value):
                return False
        elif value not in offered:
            return False
    return True
