"""Monte Carlo validation of the safety-test bounds in safealign.algorithms.bounds.

For each known cost distribution, sample size n and delta, simulate `reps`
independent safety tests and measure:

* false-pass rate (unsafe): P(UCB <= threshold) when the true mean is
  threshold + 0.1 sd. A valid bound keeps this <= delta.
* miscoverage: P(UCB < true mean), the worst case over thresholds just below
  the true mean. A valid bound keeps this <= delta too; it is the sharpest check.
* power (safe): P(UCB <= threshold) when the true mean is threshold - 0.25 sd.

A rate is flagged when it exceeds delta + 2 * sqrt(delta (1 - delta) / reps).

Moving the threshold relative to a fixed distribution is the same as shifting
the distribution relative to a fixed threshold (every bound is shift-equivariant),
so distributions keep their natural support and the threshold is set from the
true mean and sd.

Run:  .venv/bin/python bench/bound_validation.py --reps 2000 --out bench/results/bound_validation.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safealign.algorithms.bounds import (  # noqa: E402
    bernstein_radius,
    clopper_pearson_upper,
    compute_bound,
    hoeffding_radius,
    student_t_radius,
    violation_rate_bound,
)

NS = (30, 100, 1000)
DELTAS = (0.05, 0.1)
UNSAFE_MARGIN = 0.1  # true mean = threshold + 0.1 sd
SAFE_MARGIN = 0.25  # true mean = threshold - 0.25 sd
CLIP_QUANTILES = (0.001, 0.999)  # range used for Hoeffding/Bernstein on unbounded laws
BOUNDS = ("student-t", "hoeffding", "bernstein")


@dataclass(frozen=True)
class CostDist:
    name: str
    label: str
    sample: Callable[[np.random.Generator, tuple[int, int]], np.ndarray]
    mean: float
    sd: float
    low: float
    high: float
    range_kind: str  # "support" (true bounds) or "quantile" (clipped at CLIP_QUANTILES)
    clipped_mean: float  # E[clip(X, low, high)]


def _from_scipy(name: str, label: str, dist, bounded: bool) -> CostDist:
    if bounded:
        low, high = (float(v) for v in dist.support())
        kind = "support"
    else:
        low, high = (float(dist.ppf(q)) for q in CLIP_QUANTILES)
        kind = "quantile"
    # E[clip(X, low, high)] = low F(low) + int_low^high x dF + high (1 - F(high))
    inner = dist.expect(lambda x: x, lb=low, ub=high) if kind == "quantile" else float(dist.mean())
    clipped = low * dist.cdf(low) + inner + high * dist.sf(high) if kind == "quantile" else inner
    return CostDist(
        name=name,
        label=label,
        sample=lambda rng, size: dist.rvs(size=size, random_state=rng),
        mean=float(dist.mean()),
        sd=float(dist.std()),
        low=low,
        high=high,
        range_kind=kind,
        clipped_mean=float(clipped),
    )


def _two_point(p: float, hi: float) -> CostDist:
    mean = (1 - p) * -1.0 + p * hi
    sd = math.sqrt((1 - p) * (-1.0 - mean) ** 2 + p * (hi - mean) ** 2)

    def sample(rng, size):
        return np.where(rng.random(size) < p, hi, -1.0)

    return CostDist(
        name="two-point",
        label=f"-1 w.p. {1 - p:g}, +{hi:g} w.p. {p:g}",
        sample=sample,
        mean=mean,
        sd=sd,
        low=-1.0,
        high=hi,
        range_kind="support",
        clipped_mean=mean,
    )


def distributions() -> list[CostDist]:
    return [
        _from_scipy("normal", "N(0, 1)", stats.norm(), bounded=False),
        _from_scipy("lognormal", "LogNormal(0, 1) (skew 6.2)", stats.lognorm(s=1.0), bounded=False),
        _from_scipy("student-t3", "Student-t, df=3 (heavy, symmetric)", stats.t(df=3), bounded=False),
        _from_scipy("pareto2.5", "Pareto, alpha=2.5 (heavy, skewed)", stats.pareto(b=2.5), bounded=False),
        _two_point(p=0.02, hi=49.0),
        _from_scipy("beta", "Beta(2, 5) scaled to [-1, 1]", stats.beta(2, 5, loc=-1, scale=2), bounded=True),
    ]


def flag_level(delta: float, reps: int) -> float:
    return delta + 2.0 * math.sqrt(delta * (1.0 - delta) / reps)


def ucbs(x: np.ndarray, dist: CostDist, delta: float) -> dict[str, np.ndarray]:
    """Vectorised UCBs for each row of x (one row = one safety test)."""
    n = x.shape[1]
    mean = x.mean(axis=1)
    std = x.std(axis=1, ddof=1)
    xc = np.clip(x, dist.low, dist.high)
    cmean = xc.mean(axis=1)
    cvar = xc.var(axis=1, ddof=1)
    return {
        "student-t": mean + student_t_radius(std, n, delta),
        "hoeffding": cmean + hoeffding_radius(n, delta, dist.low, dist.high),
        "bernstein": cmean + bernstein_radius(cvar, n, delta, dist.low, dist.high),
    }


def check_against_scalar(x: np.ndarray, dist: CostDist, delta: float, u: dict[str, np.ndarray]) -> None:
    """The vectorised path must agree with the public scalar functions."""
    for i in range(min(3, x.shape[0])):
        for method in BOUNDS:
            rng_ = None if method == "student-t" else (dist.low, dist.high)
            ref = compute_bound(method, x[i], delta, cost_range=rng_).upper
            if not math.isclose(ref, float(u[method][i]), rel_tol=1e-9, abs_tol=1e-9):
                raise AssertionError(f"{method} vectorised {u[method][i]} != scalar {ref}")


def run_mean_bounds(reps: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for dist in distributions():
        thr_unsafe = dist.mean - UNSAFE_MARGIN * dist.sd
        thr_safe = dist.mean + SAFE_MARGIN * dist.sd
        for n in NS:
            x_unsafe = dist.sample(rng, (reps, n))
            x_safe = dist.sample(rng, (reps, n))
            for delta in DELTAS:
                u_un = ucbs(x_unsafe, dist, delta)
                u_sa = ucbs(x_safe, dist, delta)
                check_against_scalar(x_unsafe, dist, delta, u_un)
                row = {"dist": dist, "n": n, "delta": delta}
                for m in BOUNDS:
                    row[m] = {
                        "false_pass": float(np.mean(u_un[m] <= thr_unsafe)),
                        "miscoverage": float(np.mean(u_un[m] < dist.mean)),
                        "power": float(np.mean(u_sa[m] <= thr_safe)),
                    }
                rows.append(row)
    return rows


def run_violation_rate(reps: int, rng: np.random.Generator, alpha: float) -> list[dict]:
    """Clopper-Pearson bound on P(cost > 0) vs alpha, with P(cost > 0) = p_true."""
    rows = []
    cases = [("unsafe", 1.1 * alpha), ("boundary", alpha), ("safe", 0.9 * alpha), ("safe", 0.5 * alpha)]
    for n in NS:
        for delta in DELTAS:
            table = np.array([clopper_pearson_upper(k, n, delta) for k in range(n + 1)])
            for kind, p in cases:
                # costs: +1 (unsafe response) w.p. p, else -1
                costs = np.where(rng.random((reps, n)) < p, 1.0, -1.0)
                k = (costs > 0).sum(axis=1)
                upper = table[k]
                for i in range(2):  # vectorised path == public function
                    ref = violation_rate_bound(costs[i], delta, alpha).upper
                    assert math.isclose(ref, float(upper[i]), rel_tol=1e-12)
                rows.append(
                    {"kind": kind, "p": p, "n": n, "delta": delta,
                     "pass": float(np.mean(upper <= alpha)),
                     "miscoverage": float(np.mean(upper < p))}
                )
    return rows


def fmt(rate: float, limit: float | None) -> str:
    s = f"{rate:.3f}"
    return f"**{s}!**" if limit is not None and rate > limit else s


def render(mean_rows, viol_rows, reps, seed, alpha, elapsed) -> tuple[str, list[str]]:
    flagged: list[str] = []
    lines = [
        "# Safety-test bound validation",
        "",
        f"Generated by `bench/bound_validation.py --reps {reps} --seed {seed}` "
        f"({elapsed:.0f} s). Each cell is a rate over {reps} simulated safety tests.",
        "",
        "- **FP** (false pass): P(UCB <= threshold) with the true mean at threshold "
        f"+ {UNSAFE_MARGIN} sd (unsafe). Must be <= delta.",
        "- **MC** (miscoverage): P(UCB < true mean), the limit of FP as the margin goes "
        "to 0. Must be <= delta for a valid bound.",
        f"- **Pow** (power): P(UCB <= threshold) with the true mean at threshold - {SAFE_MARGIN} sd (safe).",
        "- `**x!**` marks FP or MC above delta + 2 sqrt(delta (1 - delta) / reps) "
        f"({flag_level(0.05, reps):.4f} for delta 0.05, {flag_level(0.1, reps):.4f} for delta 0.1).",
        "- Range for Hoeffding/Bernstein: *support* = the true support; *q* = clipped at the "
        f"{CLIP_QUANTILES[0]}/{CLIP_QUANTILES[1]} quantiles of the true law (not known in practice; "
        "values above the upper quantile are clipped, so the bound targets E[clipped cost], "
        "which is below E[cost] by the bias listed in the distribution table).",
        "",
        "## Distributions",
        "",
        "| name | law | mean | sd | range used | E[clipped] - mean (in sd) |",
        "|---|---|---|---|---|---|",
    ]
    seen = []
    for row in mean_rows:
        d = row["dist"]
        if d.name in seen:
            continue
        seen.append(d.name)
        bias = (d.clipped_mean - d.mean) / d.sd
        kind = "support" if d.range_kind == "support" else "q"
        lines.append(
            f"| {d.name} | {d.label} | {d.mean:.4g} | {d.sd:.4g} | "
            f"[{d.low:.4g}, {d.high:.4g}] ({kind}) | {bias:+.4f} |"
        )
    lines += [
        "",
        "## Bounds on E[cost]",
        "",
        "| dist | n | delta | t FP | t MC | t Pow | Hoeff FP | Hoeff MC | Hoeff Pow "
        "| Bern FP | Bern MC | Bern Pow |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in mean_rows:
        d, n, delta = row["dist"], row["n"], row["delta"]
        lim = flag_level(delta, reps)
        cells = []
        for m in BOUNDS:
            r = row[m]
            cells += [fmt(r["false_pass"], lim), fmt(r["miscoverage"], lim), fmt(r["power"], None)]
            for key in ("false_pass", "miscoverage"):
                if r[key] > lim:
                    rng_note = f", range {d.range_kind}" if m != "student-t" else ""
                    flagged.append(
                        f"{m} / {d.name} / n={n} / delta={delta}: "
                        f"{'false-pass' if key == 'false_pass' else 'miscoverage'} "
                        f"{r[key]:.3f} > {lim:.3f}{rng_note}"
                    )
        lines.append(f"| {d.name} | {n} | {delta} | " + " | ".join(cells) + " |")

    lines += [
        "",
        f"## Violation-rate bound (Clopper-Pearson on P(cost > 0)), alpha = {alpha}",
        "",
        "Pass = P(upper <= alpha). For `unsafe` and `boundary` rows pass is a false-pass rate "
        "and must be <= delta; for `safe` rows it is power. MC = P(upper < true p).",
        "",
        "| P(cost>0) | kind | n | delta | pass | MC |",
        "|---|---|---|---|---|---|",
    ]
    for r in viol_rows:
        lim = flag_level(r["delta"], reps)
        fp_lim = lim if r["kind"] != "safe" else None
        lines.append(
            f"| {r['p']:.3f} | {r['kind']} | {r['n']} | {r['delta']} | "
            f"{fmt(r['pass'], fp_lim)} | {fmt(r['miscoverage'], lim)} |"
        )
        if fp_lim is not None and r["pass"] > lim:
            flagged.append(f"clopper-pearson / p={r['p']:.3f} / n={r['n']} / delta={r['delta']}: "
                           f"false-pass {r['pass']:.3f} > {lim:.3f}")
        if r["miscoverage"] > lim:
            flagged.append(f"clopper-pearson / p={r['p']:.3f} / n={r['n']} / delta={r['delta']}: "
                           f"miscoverage {r['miscoverage']:.3f} > {lim:.3f}")

    lines += ["", "## Flagged (rate above delta + 2 binomial s.e.)", ""]
    lines += [f"- {f}" for f in flagged] or ["- none"]
    lines += ["", "## Reading", "", summary_paragraph(mean_rows, reps, flagged), ""]
    return "\n".join(lines), flagged


def summary_paragraph(mean_rows, reps, flagged) -> str:
    """Plain-language reading of the table; every number is taken from the rows."""
    lim = {d: flag_level(d, reps) for d in DELTAS}

    def t_cells(name, metric, delta):
        return [(r["n"], r["student-t"][metric]) for r in mean_rows
                if r["dist"].name == name and r["delta"] == delta]

    def listing(name, metric, delta, only_flagged=True):
        cells = [(n, v) for n, v in t_cells(name, metric, delta) if v > lim[delta] or not only_flagged]
        return ", ".join(f"{v:.3f} at n={n}" for n, v in cells) or "none"

    parts = [
        "**Where Student-t breaks.** The HC-RLHF t-test is only approximately valid "
        "(flag level delta + 2 s.e.; figures below are for delta = 0.05 unless stated)."
    ]
    parts.append(
        "(1) *Rare large costs* (two-point, 2% of responses at +49): false-pass rate "
        f"{listing('two-point', 'false_pass', 0.05)} (delta 0.1: {listing('two-point', 'false_pass', 0.1)}). "
        "A safety set of n such costs contains no large cost with probability 0.98^n "
        f"({0.98 ** 30:.2f} at n=30, {0.98 ** 100:.2f} at n=100); the sample sd is then 0 and the "
        "test passes whatever delta is."
    )
    parts.append(
        "(2) *Skewed / heavy right tails*: with the true mean 0.1 sd above the threshold the "
        f"false-pass rate stays near or below delta (n=30: lognormal "
        f"{t_cells('lognormal', 'false_pass', 0.05)[0][1]:.3f}, Pareto "
        f"{t_cells('pareto2.5', 'false_pass', 0.05)[0][1]:.3f}), but that margin hides the problem: "
        "the miscoverage P(UCB < true mean), i.e. the false-pass rate for a mean just above the "
        f"threshold, is lognormal {listing('lognormal', 'miscoverage', 0.05, False)}; "
        f"Pareto(2.5) {listing('pareto2.5', 'miscoverage', 0.05, False)}. "
        "It shrinks with n but slowly."
    )
    parts.append(
        "(3) Normal and symmetric heavy-tailed (t, df=3) costs are fine; mildly skewed bounded costs "
        f"(beta, skew 0.6) are borderline ({listing('beta', 'miscoverage', 0.05, False)})."
    )
    others = {m: [f for f in flagged if f.startswith(m)] for m in ("hoeffding", "bernstein", "clopper")}
    small_n_power = max(r[m]["power"] for r in mean_rows for m in ("hoeffding", "bernstein") if r["n"] < 1000)
    exact = [m.capitalize() for m in ("hoeffding", "bernstein") if not others[m]]
    parts.append(
        (f"{' and '.join(exact)} never exceed delta here" if exact else
         "Hoeffding/Bernstein exceed delta in some cells (see the flag list)")
        + " (they hold for any law on the true support; with a quantile range the guarantee is only "
        f"for the clipped cost), but their power is at most {small_n_power:.3f} for n <= 100. "
        + ("Clopper-Pearson on P(cost > 0) stays within delta." if not others["clopper"]
           else "Clopper-Pearson has flagged cells (see the flag list).")
    )
    parts.append(
        "**The documentation must warn** that the Student-t safety test assumes a near-normal "
        "sample mean; that with small safety sets (tens to a few hundred prompts) and a cost "
        "distribution that is right-skewed, heavy-tailed or has rare large values, an unsafe model "
        "can pass far more often than delta; that such users should enlarge the safety set, or use "
        "a bounded cost with the Hoeffding/Bernstein bound, or test the violation rate; and that "
        "the guarantee is on the cost model's score, not on true harm."
    )
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000, help="simulated tests per setting (>= 100)")
    ap.add_argument("--seed", type=int, default=20250609)
    ap.add_argument("--alpha", type=float, default=0.1, help="allowed violation rate for Clopper-Pearson")
    ap.add_argument("--out", type=Path, default=Path("bench/results/bound_validation.md"))
    args = ap.parse_args(argv)
    if args.reps < 100:
        ap.error("--reps must be >= 100")

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    mean_rows = run_mean_bounds(args.reps, rng)
    viol_rows = run_violation_rate(args.reps, rng, args.alpha)
    elapsed = time.perf_counter() - t0
    text, flagged = render(mean_rows, viol_rows, args.reps, args.seed, args.alpha, elapsed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} in {elapsed:.1f} s; {len(flagged)} flagged cell(s)")
    for f in flagged:
        print("  FLAG", f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
