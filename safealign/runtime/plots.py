"""PNG plots for reports (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Lay out, write (PNG, 100 dpi, creating the directory) and close ``fig``."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return Path(path)


def _ylabel(keys: list[str]) -> str:
    """A y-axis label for metric keys when the caller gives none: their common unit, else their names."""
    names = [k.split("/")[-1] for k in keys]
    if all(k.startswith("time/") for k in keys):
        return "seconds"
    for word, label in (("accuracy", "accuracy (fraction correct)"), ("loss", "loss"), ("lambda", "lambda (Lagrange multiplier)")):
        if all(word in n for n in names):
            return label
    if all(n in ("cost", "J_c", "J_c_mean") for n in names):
        return "cost (> 0 unsafe)"
    return ", ".join(dict.fromkeys(names))


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def curves(rows: list[dict], keys: list[str], path: Path, title: str, hlines: dict[str, float] | None = None,
           ylabel: str | None = None) -> Path | None:
    """One line per metric key against step (rows without the key are skipped); integer step ticks,
    a y label (``ylabel``, else from the keys), a dashed line per ``hlines`` entry."""
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
    ax.set_ylabel(ylabel or _ylabel(list(series)))
    _integer_steps(ax)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def histogram(groups: dict[str, list[float]], path: Path, title: str, vlines: dict[str, float] | None = None, xlabel: str = "score",
              ylabel: str = "count") -> Path:
    """Overlaid histograms of ``groups`` on shared bins, a dashed line per ``vlines`` entry (a threshold in red)."""
    plt = _plt()
    import numpy as np

    values = [float(v) for vs in groups.values() for v in vs] + list((vlines or {}).values())
    bins = np.histogram_bin_edges(values, bins=30) if values else 30
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in groups.items():
        if len(values):
            ax.hist(values, bins=bins, alpha=0.55, label=f"{label} (n={len(values)})")
    for label, x in (vlines or {}).items():
        ax.axvline(x, linestyle="--", linewidth=1.2, label=f"{label} = {x:.3g}", color="red" if "threshold" in label else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


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
    return _save(fig, path)


def policy_comparison(policies: dict[str, dict], path: Path, *, harm_target: float | None = None, reference: str | None = None,
                      title: str = "harm against helpfulness") -> Path | None:
    """The first figure of a comparison of policies: oracle harm rate (x) against helpfulness on
    benign prompts (y), one point per policy with +-1 standard error bars from the samples
    (``harm_rate_se``, ``helpfulness_mean_benign_prompts_se`` of evaluate.oracle_metrics), the harm
    target as a vertical line and ``reference``'s helpfulness as a horizontal one.

    ``policies``: label -> oracle metrics (harm_rate, helpfulness_mean_benign_prompts and their _se)."""
    pts = {k: o for k, o in policies.items() if o and o.get("harm_rate") is not None and o.get("helpfulness_mean_benign_prompts") is not None}
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, o in pts.items():
        x, y = 100 * o["harm_rate"], o["helpfulness_mean_benign_prompts"]
        xerr = 100 * o["harm_rate_se"] if o.get("harm_rate_se") is not None else None
        yerr = o.get("helpfulness_mean_benign_prompts_se")
        ax.errorbar([x], [y], xerr=None if xerr is None else [xerr], yerr=None if yerr is None else [yerr], fmt="o", capsize=4, label=label)
    if harm_target is not None:
        ax.axvline(100 * harm_target, color="red", linestyle="--", linewidth=1.2, label=f"harm target ({100 * harm_target:g}%)")
    if reference in pts:
        ax.axhline(pts[reference]["helpfulness_mean_benign_prompts"], color="grey", linestyle=":", linewidth=1.2, label=f"{reference} helpfulness")
    ax.set_xlabel("oracle harm rate (% of answers unsafe)")
    ax.set_ylabel("oracle helpfulness on benign prompts")
    n = next(iter(pts.values()))
    k = n.get("samples_per_prompt")
    ax.set_title(f"{title} ({n.get('prompts', '?')} prompts x {k:g} answers; bars: +-1 s.e. over prompts)" if k else title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)
