"""report.json (machine-readable) + report.md (the same facts for a person)."""

from __future__ import annotations

from pathlib import Path

from safealign.runtime.io import atomic_write_json, atomic_write_text


def cell(v) -> str:
    """One Markdown table cell: floats to 4 significant digits, ``|`` and newlines escaped."""
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def table(header: list, rows: list[list]) -> list[str]:
    """A Markdown table (every cell through :func:`cell`)."""
    return ["| " + " | ".join(cell(h) for h in header) + " |", "|" + " --- |" * len(header)] + \
           ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]


def md_dict(d: dict, depth: int = 0) -> list[str]:
    lines = []
    flat = {k: v for k, v in d.items() if not isinstance(v, (dict, list))}
    if flat:
        lines += table(["key", "value"], [[k, v] for k, v in flat.items()]) + [""]
    for k, v in d.items():
        if isinstance(v, dict) and v:
            lines += [f"{'#' * min(3 + depth, 6)} {k}", ""] + md_dict(v, depth + 1)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            keys = list(dict.fromkeys(key for x in v for key in x))
            lines += [f"{'#' * min(3 + depth, 6)} {k}", ""] + table(keys, [[x.get(key, "") for key in keys] for x in v]) + [""]
        elif isinstance(v, list) and v:
            lines += [f"- **{k}**: {', '.join(cell(x) for x in v)}", ""]
    return lines


def write(out: Path, summary: dict, *, title: str, intro: str | None = None) -> None:
    """Write ``report.json`` and ``report.md``. A directory that holds a model saved by safealign
    (``safealign.json``) also gets its Hub model card ``README.md`` from the same summary."""
    out = Path(out)
    atomic_write_json(out / "report.json", summary)
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += md_dict(summary)
    pngs = sorted((out / "plots").glob("*.png")) if (out / "plots").is_dir() else []
    if pngs:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in pngs] + [""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    from safealign.runtime import model_card

    model_card.write_card(out, summary)
