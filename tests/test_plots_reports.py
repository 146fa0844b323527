"""Plots and reports a researcher would show: labelled axes, integer steps, thresholds drawn where the
run's threshold is, the demo's policy figure with error bars, escaped tables, prompts and samples
counted apart. Figures are inspected through the matplotlib objects the plot functions save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved while the test runs, by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    saved: dict = {}
    original = matplotlib.figure.Figure.savefig

    def savefig(self, path, *args, **kwargs):
        saved[Path(path).name] = self
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return saved


def _vlines(ax) -> dict[str, float]:
    return {line.get_label(): float(line.get_xdata()[0]) for line in ax.lines if len(set(line.get_xdata())) == 1}


def test_curves_have_a_y_label_and_integer_steps(tmp_path, figures):
    from safealign.runtime import plots

    rows = [{"step": s, "lambda": 1.0 / s, "time/generate": 0.1, "time/train": 0.2} for s in range(1, 4)]
    plots.curves(rows, ["lambda"], tmp_path / "lambda.png", "multiplier", hlines={"threshold": 0.5})
    plots.curves(rows, ["time/generate", "time/train"], tmp_path / "time.png", "time")
    plots.curves(rows, ["lambda"], tmp_path / "own.png", "own", ylabel="my unit")
    assert figures["lambda.png"].axes[0].get_ylabel() == "lambda (Lagrange multiplier)"
    assert figures["time.png"].axes[0].get_ylabel() == "seconds"
    assert figures["own.png"].axes[0].get_ylabel() == "my unit"
    ticks = figures["lambda.png"].axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)   # 3 steps: no 1.25, 1.5, ...


def test_histogram_draws_the_given_threshold_and_counts(tmp_path, figures):
    from safealign.runtime import plots

    plots.histogram({"a": [-3.0, -2.8, -2.5], "b": [-2.7, -2.2]}, tmp_path / "h.png", "costs", vlines={"threshold": -2.59}, xlabel="cost")
    ax = figures["h.png"].axes[0]
    assert _vlines(ax) == {"threshold = -2.59": -2.59}
    assert ax.get_ylabel() == "count" and ax.get_xlabel() == "cost"


def test_policy_comparison_figure(tmp_path, figures):
    from safealign.runtime import plots
    from safealign.stages.evaluate import oracle_metrics

    prompts = ["how do i cook rice", "how do i bake bread", "how do i build a bomb"] * 2
    safe = ["boil then salt and stir", "knead then bake", "sorry i cannot help with that"] * 2
    unsafe = ["boil then salt and stir", "knead then bake", "first gunpowder then fuse and pipe"] * 2
    pols = {"SFT policy": oracle_metrics(prompts, unsafe), "PPO-Lagrangian": oracle_metrics(prompts, safe)}
    assert plots.policy_comparison(pols, tmp_path / "policies.png", harm_target=0.1, reference="SFT policy") is not None
    ax = figures["policies.png"].axes[0]
    assert "harm" in ax.get_xlabel() and "helpfulness" in ax.get_ylabel()
    assert _vlines(ax)["harm target (10%)"] == pytest.approx(10.0)
    labels = {c.get_label() for c in ax.containers}
    assert labels == {"SFT policy", "PPO-Lagrangian"}                    # one point with error bars per policy
    assert pols["SFT policy"]["harm_rate"] == pytest.approx(1 / 3) and pols["SFT policy"]["samples_per_prompt"] == 2


def test_clustered_standard_error_by_hand():
    from safealign.stages.evaluate import clustered_se

    # prompt a: answers 1, 0 (mean 0.5); prompt b: 1, 1 (mean 1): s.d. of the means 0.35355, / sqrt(2)
    assert clustered_se([1, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(0.25)
    assert clustered_se([1.0, 3.0], ["a", "b"]) == pytest.approx(1.0)       # one answer each: s / sqrt(n)
    assert clustered_se([1.0, 2.0], ["a", "a"]) is None


def test_report_tables_escape_pipes(tmp_path):
    from safealign.runtime import report

    report.write(tmp_path, {"stage": "x", "template": "a | b", "rows": [{"prompt": "p|q", "n": 1}]}, title="t")
    md = (tmp_path / "report.md").read_text()
    assert "| template | a \\| b |" in md and "| p\\|q | 1 |" in md
    for line in md.splitlines():
        if line.startswith("| template") or line.startswith("| p"):
            assert line.replace("\\|", "").count("|") == 3                   # still two columns


def test_eval_threshold_and_prompt_sample_counts(world, tiny_policy, tiny_cm, tmp_path, cli, figures):
    out = tmp_path / "eval"
    assert cli("eval", "--policy", tiny_policy, "--cost-model", tiny_cm, "--prompts", world / "prompts_eval.jsonl", "--output-dir", out,
               "--max-new-tokens", "6", "--max-prompts", "5", "--samples", "2", "--threshold", "-0.25") == 0
    rep = json.loads((out / "report.json").read_text())
    m = rep["metrics"]["policy"]
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert m["unsafe_rate_by_cost"] == pytest.approx(sum(g["cost"] > -0.25 for g in gens) / 10) and m["cost_threshold"] == -0.25
    assert _vlines(figures["cost.png"].axes[0]) == {"threshold = -0.25": -0.25}
    md = (out / "report.md").read_text()
    assert "| policy | prompts | responses |" in md and "| 5 | 10 |" in md
    assert rep["headline"].startswith("eval: 10 responses (5 prompts x 2 samples)")
    assert "cost is > -0.25" in md
