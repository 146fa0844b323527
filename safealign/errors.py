"""Errors a user can cause, and the exit codes of the CLI (see DESIGN.md).

0 success; 1 anything unexpected; 2 bad input (config, data, paths); 3 safety test not passed.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_SAFE = 3


class BadInput(Exception):
    """A problem with what the user gave us: the message says where (file/row/key) and how to fix it.

    The CLI prints it as one paragraph without a traceback and exits with code 2. Raise it before
    anything is written into the output directory.
    """

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        parts = [message.rstrip(".") + "."]
        if where:
            parts.insert(0, f"{where}:")
        if fix:
            parts.append(f"Fix: {fix.rstrip('.')}.")
        super().__init__(" ".join(parts))


class SafetyTestFailed(Exception):
    """The high-confidence safety test did not pass: "No Solution Found" (exit code 3)."""


class PushFailed(Exception):
    """``--push-to-hub`` failed for a reason the user cannot fix from the command line (network,
    server): exit code 1, one paragraph, the local result kept. Refusals the user can fix are BadInput."""


class RunFinished(Exception):
    """``--resume`` on a run that already finished (its report.json exists): nothing is trained and
    nothing is written. The CLI prints the message and exits 0, so a retried command is harmless."""
