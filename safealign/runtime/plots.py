"""PNG plots for reports (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(rows: list[dict], keys: list[str], path: Path, title: str, hlines: dict[str, float] | None = None) -> Path | None:
    """One line per metric key against step (rows without the key are skipped)."""
    series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
    styles = [("red", "--"), ("black", ":"), ("purple", "-.")]
    for i, (label, y) in enumerate((hlines or {}).items()):
        color, dash = styles[i % len(styles)]
        ax.axhline(y, color=color, linestyle=dash, linewidth=1.2, label=f"{label} ({y:.3g})")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def histogram(groups: dict[str, list[float]], path: Path, title: str, vlines: dict[str, float] | None = None, xlabel: str = "score") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in groups.items():
        if len(values):
            ax.hist(values, bins=30, alpha=0.55, label=f"{label} (n={len(values)})")
    for label, x in (vlines or {}).items():
        ax.axvline(x, linestyle="--", linewidth=1.2, label=f"{label} = {x:.3g}", color={"threshold": "red"}.get(label, "black"))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def reliability(rows: list[tuple], path: Path, title: str) -> Path:
    """Reliability diagram from expected_calibration_error rows (lo, hi, count, mean_prob, frac_unsafe)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    pts = [(r[3], r[4], r[2]) for r in rows if r[2]]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=[20 + 200 * p[2] / max(q[2] for q in pts) for p in pts])
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
    ax.set_xlabel("predicted P(unsafe) = sigmoid(cost)")
    ax.set_ylabel("observed fraction unsafe")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
