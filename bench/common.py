"""What every benchmark script ends with: its report printed, and written where --out says."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], out: Path | None) -> str:
    """Print the report (lines joined, one trailing newline) and write it to ``out`` (folders made)."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text, end="")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text
