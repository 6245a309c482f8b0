"""What the benchmarks print: timestamped progress lines, medians and figures, and the targets
each checks (one PASS/FAIL/NOT RUN line each, printed alike by every benchmark so that a reader
compares them at a glance)."""

from __future__ import annotations

import statistics
import time


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def median(values):
    """The median of the values that are not None; None when none is."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def tally(counter, most: int | None = None, spec: str = "") -> str:
    """A Counter's most common entries as "name count, name count"."""
    return ", ".join(f"{k} {v:{spec}}" for k, v in counter.most_common(most))


def table_head(header: str) -> str:
    """Print a table's header between two rules; returns the rule, to close the table with."""
    rule = "-" * len(header)
    print(rule, header, rule, sep="\n")
    return rule


class Targets:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str]] = []  # (name, value against limit, verdict)

    def check(self, name: str, value: float | None, limit: float, at_least: bool,
              unit: str = "x", spec: str = ".2f") -> None:
        """A measured figure against its limit; None when the run that gives it did not run."""
        if value is None:
            self.lines.append((name, "n/a", "NOT RUN"))
            return
        sign = ">=" if at_least else "<="
        good = value >= limit if at_least else value <= limit
        self.add(name, f"{value:{spec}}{unit} (target {sign} {limit:g}{unit})", good)

    def add(self, name: str, shown: str, good: bool | None) -> None:
        """A target judged by the caller; None: not run."""
        verdict = "NOT RUN" if good is None else "PASS" if good else "FAIL"
        self.lines.append((name, shown, verdict))

    def report(self) -> bool:
        """Print every target; True when none failed."""
        print()
        print("targets:")
        width = max((len(name) for name, _, _ in self.lines), default=0)
        for name, shown, verdict in self.lines:
            print(f"  {verdict:<8}{name:<{width}}  {shown}")
        return all(verdict != "FAIL" for _, _, verdict in self.lines)
