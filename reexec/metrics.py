"""A small Prometheus registry: counters, gauges and histograms with labels, text format.

Written here rather than taken from prometheus-client: we need a few dozen series, exposition
as text on our own endpoint, and no global process collectors or threads.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence

LabelValues = tuple[str, ...]

DEFAULT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}"
            for k, v in sorted(self.values.items())
        ]


class Gauge(_Metric):
    """A gauge whose values come from a callback at scrape time."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        collect: Callable[[], Iterable[tuple[LabelValues, float]]] | None = None,
    ) -> None:
        super().__init__(name, help, labels)
        self.collect = collect
        self.values: dict[LabelValues, float] = {}

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value

    def render(self) -> list[str]:
        items = dict(self.values)
        if self.collect is not None:
            items.update(self.collect())
        return [
            f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in sorted(items.items())
        ]


class CollectedCounter(Gauge):
    """A counter whose totals are read from elsewhere at scrape time."""

    kind = "counter"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[LabelValues, list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, *labels: str) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            s[i] += 1
        s[-2] += value
        s[-1] += 1

    def render(self) -> list[str]:
        out = []
        for labels, s in sorted(self.series.items()):
            cumulative = 0.0
            for i, bound in enumerate(self.buckets):
                cumulative += s[i]
                le = f'le="{_fmt(bound)}"'
                out.append(
                    f"{self.name}_bucket{_labels(self.label_names, labels, le)} {_fmt(cumulative)}"
                )
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, labels, inf)} {_fmt(s[-1])}")
            out.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_fmt(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, labels)} {_fmt(s[-1])}")
        return out


class Registry:
    def __init__(self) -> None:
        self.metrics: dict[str, _Metric] = {}

    def add(self, metric: _Metric) -> _Metric:
        self.metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics.values():
            body = m.render()
            if body or m.kind == "histogram":
                lines += m.header() + body
        return "\n".join(lines) + "\n"


# Metrics observed where they happen; everything else is collected at scrape time.
RPC_DURATION = Histogram(
    "reexec_rpc_duration_seconds", "gRPC calls handled, by method and status", ("method", "code")
)
QUEUE_WAIT = Histogram(
    "reexec_action_queue_wait_seconds", "Time actions spent queued before a worker took them"
)
EXECUTION_DURATION = Histogram(
    "reexec_action_execution_seconds", "Time from dispatch to completion of executed actions"
)
CAS_BYTES = Counter(
    "reexec_cas_bytes_total", "Bytes through the ByteStream service", ("direction",)
)
STATE_STORE_LATENCY = Histogram(
    "reexec_state_store_seconds",
    "Round trips to the shared scheduler state store (Redis), by operation",
    ("op",),
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0),
)
STATE_STORE_ERRORS = Counter(
    "reexec_state_store_errors_total", "Calls to the shared scheduler state store that failed"
)
SCHEDULER_CAS_CONFLICTS = Counter(
    "reexec_scheduler_cas_conflicts_total",
    "Transitions whose compare-and-set lost to another writer and were re-applied",
)
SCHEDULER_CAS_EXHAUSTED = Counter(
    "reexec_scheduler_cas_exhausted_total",
    "Transitions that lost every compare-and-set they tried (answered UNAVAILABLE)",
)
