"""One progress convention for every long loop (training steps, rollouts, generation, stages).

On a terminal: a tqdm bar on stderr. On a pipe or a file: one plain line on stderr at the first
update, then every ``SAFEALIGN_PROGRESS_SECONDS`` (default 10) seconds and at the end, never a
``\\r`` frame::

    sft: 40/100 steps (40%), 12 s elapsed, ETA 18 s, loss=1.234

ETA = elapsed / done x remaining, counted from this run's first update (a resumed run's earlier
steps do not make it look faster). ``SAFEALIGN_NO_PROGRESS=1`` silences it (the tests set it);
processes other than the local main one pass ``enabled=False``.

:class:`Progress` has the part of tqdm's interface the loops use (``update``, ``set_postfix``,
``close``), so a tqdm bar is replaced by changing its constructor only. :class:`StageCounter` is
the same convention for a chain of stages of unequal length (the demo).
"""

from __future__ import annotations

import os
import sys
import time


def silenced() -> bool:
    return os.environ.get("SAFEALIGN_NO_PROGRESS", "") not in ("", "0")


def interval_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("SAFEALIGN_PROGRESS_SECONDS", "10")))
    except ValueError:
        return 10.0


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _fmt_value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    """Progress of ``total`` units of work, ``initial`` of them already done (a resumed run)."""

    def __init__(self, total: int, desc: str, *, unit: str = "steps", initial: int = 0, enabled: bool = True,
                 every_s: float | None = None, stream=None):
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.stream = stream or sys.stderr
        self.enabled = enabled and not silenced()
        self.every_s = interval_seconds() if every_s is None else every_s
        self.postfix: dict = {}
        self._start_n, self._t0, self._last = self.n, time.perf_counter(), None
        self._bar = None
        if self.enabled and _isatty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=f" {unit}", dynamic_ncols=True, file=self.stream)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def set_postfix(self, **values) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and (self._last is None or now - self._last >= self.every_s or self.n >= self.total):
            self._last = now
            print(self.line(now), file=self.stream, flush=True)

    def eta(self, now: float | None = None) -> float | None:
        done = self.n - self._start_n
        if done <= 0:
            return None
        elapsed = (now or time.perf_counter()) - self._t0
        return elapsed / done * max(self.total - self.n, 0)

    def line(self, now: float | None = None) -> str:
        now = now or time.perf_counter()
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}", f"{fmt_seconds(now - self._t0)} elapsed"]
        if self.n < self.total:
            parts.append(f"ETA {fmt_seconds(self.eta(now))}")
        parts += [f"{k}={_fmt_value(v)}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress(total: int, desc: str, **kw) -> Progress:
    return Progress(total, desc, **kw)


class StageCounter:
    """Progress over named stages of unequal length: ``weights`` maps stage -> expected share of the
    time. Every stage start prints one line (terminal or pipe)::

        demo: stage 6/17 ppo-lag ppo, 1.2 min elapsed, ETA 2.0 min

    Stages found already done (a resumed chain) count as done but not as time spent, so the ETA
    comes from the stages this run actually ran."""

    def __init__(self, weights: dict[str, float], desc: str, *, stream=None, enabled: bool = True):
        self.weights, self.desc = dict(weights), desc
        self.keys = list(weights)
        self.stream = stream or sys.stderr
        self.enabled = enabled and not silenced()
        self._t0 = time.perf_counter()
        self._ran_weight = 0.0      # weight of the stages run (not skipped) so far
        self._done: set[str] = set()
        self._current: str | None = None

    def _finish_current(self) -> None:
        if self._current is not None:
            self._ran_weight += self.weights[self._current]
            self._done.add(self._current)
            self._current = None

    def eta(self) -> float | None:
        elapsed = time.perf_counter() - self._t0
        if self._ran_weight <= 0:
            return None
        left = sum(w for k, w in self.weights.items() if k not in self._done)
        return elapsed / self._ran_weight * left

    def start(self, key: str, note: str = "") -> None:
        self._finish_current()
        self._current = key
        self._emit(key, note)

    def skip(self, key: str, note: str = "done earlier, skipped") -> None:
        self._finish_current()
        self._done.add(key)
        self._emit(key, note)

    def close(self) -> None:
        self._finish_current()

    def _emit(self, key: str, note: str) -> None:
        if not self.enabled:
            return
        i = self.keys.index(key) + 1
        parts = [f"{self.desc}: stage {i}/{len(self.keys)} {key}" + (f" ({note})" if note else ""),
                 f"{fmt_seconds(time.perf_counter() - self._t0)} elapsed"]
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {fmt_seconds(eta)}")
        print(", ".join(parts), file=self.stream, flush=True)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
