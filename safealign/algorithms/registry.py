"""A named table of pure functions (the verl ``core_algos`` idea): ``@TABLE.register("name", **meta)``
adds a function with its metadata, ``TABLE.get("name")`` returns the entry or says which names exist."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable
    doc: str                                   # the first line of the function's docstring
    meta: dict = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:    # entry.needs_critic etc. read the metadata
        try:
            return self.meta[key]
        except KeyError:
            raise AttributeError(key) from None


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str, **meta):
        def wrap(fn: Callable) -> Callable:
            self[name] = Entry(name, fn, (fn.__doc__ or "").strip().splitlines()[0], meta)
            return fn

        return wrap

    def get(self, name: str) -> Entry:  # type: ignore[override]
        if name not in self:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self))}")
        return self[name]
