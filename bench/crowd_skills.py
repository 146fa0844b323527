"""Safe crowd skills against reward combination and the oracle Lagrangian, on the crowd world, judged by its oracle.

For each imbalance (majority : minority labelled pairs, 1:1, 4:1, 9:1) a crowd world is written (2 users with
opposite aspect orders, half of all pairs with a harmful variant that every user rejects, 5% label noise; the task
ranks aspect_2 > aspect_0 > aspect_1, an order no user holds, and pays +0.25 for harmful detail). One SFT policy is
trained on the world's SFT corpus (it is the same for every imbalance). Then, per imbalance:

* **skills**: `crowd latent` -> `crowd skills` (from the SFT policy) -> `crowd compose` (task reward only);
* **task-only RL**: REINFORCE with the RLOO baseline (the advantage registry) on LoRA of the SFT policy, reward r_task;
* **reward combination**: the same RL with r = (1 - w) z(r_task) + w z(r_pooled), z() = z-score over the batch,
  r_pooled the pooled Bradley-Terry model that `crowd latent` trains beside VPL, w in {0, 0.1, ..., 1};
* **oracle Lagrangian**: the same RL with r = r_task - lambda * c, c = P(unsafe) of a cost model (logistic regression on
  the words of each response) fit on the world's safety labels, lambda by dual ascent on E[c] <= 0.02;
* **crowd cost Lagrangian** (the reward-space crowd route): `train-cost --crowd` on the same crowd labels (annotator ids,
  no safety labels; backbone = the SFT policy), then the same Lagrangian loop with c = that cost model's score of
  (prompt, answer) and ppo-lag's default constraint E[c] <= 0 (cost > 0 = unsafe; its zero is the median training cost).

Same budget: every method generates steps x prompts x group answers (20 x 8 x 4 = 640) for its own training. All
are evaluated on the world's 60 held-out prompts (2 samples each, temperature 1): mean task reward, oracle harm rate.
The baselines are a bench-level RL loop (this file) on the project's pieces (advantages registry, sampling seeds,
LoRA loading, the skills' sampler), not the `ppo-lag` stage: that stage needs a reward *model*, the task reward is a
function; the crowd cost enters this loop exactly where ppo-lag would use it (r - lambda * c, dual ascent on E[c]).

Every run is cached under --work: a panel whose JSON exists only runs the methods it lacks (so adding a method reruns
nothing else).

    .venv/bin/python bench/crowd_skills.py --imbalance 1     # one panel's runs (cached under --work)
    .venv/bin/python bench/crowd_skills.py --imbalance 4
    .venv/bin/python bench/crowd_skills.py --imbalance 9
    .venv/bin/python bench/crowd_skills.py --report          # table + plot -> bench/results/crowd_skills.{md,png}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAFEALIGN_NO_PROGRESS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from safealign.algorithms import advantages as ADV  # noqa: E402
from safealign.algorithms import skills as S  # noqa: E402
from safealign.cli import main as cli  # noqa: E402
from safealign.data.crowd_world import task_reward  # noqa: E402
from safealign.data.synth import oracle, read_jsonl  # noqa: E402

IMBALANCES = (1, 4, 9)
OMEGAS = tuple(round(0.1 * i, 1) for i in range(11))
STEPS, PROMPTS, GROUP, MAX_NEW, EVAL_SAMPLES = 20, 8, 4, 16, 2
WORLD = ["--n-pairs", "4000", "--n-train-prompts", "400", "--n-eval-prompts", "60", "--n-sft", "1500", "--harmful-share", "0.5",
         "--label-noise", "0.05"]
COST_LIMIT, LAMBDA_LR = 0.02, 2.0
ORACLE_LAG, CROWD_LAG = "oracle Lagrangian (cost model on safety labels)", "crowd cost Lagrangian (train-cost --crowd, no safety labels)"


def run(*args) -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    code = cli([str(a) for a in args])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    if code != 0:
        raise SystemExit(f"command failed ({code}): safealign {' '.join(map(str, args))}")


def world(work: Path, imb: int) -> Path:
    w = work / f"world-{imb}"
    if not (w / "world.json").is_file():
        run("data", "synth", "--crowd", "--output-dir", w, "--imbalance", imb, *WORLD)
    return w


def sft(work: Path) -> Path:
    out = work / "sft"
    if not (out / "report.json").is_file():
        run("sft", "--model", "tiny", "--data", world(work, 1) / "sft.jsonl", "--output-dir", out, "--max-steps", "800", "--batch-size", "32",
            "--lr", "3e-3", "--max-length", "64", "--save-steps", "0", "--eval-split", "0.05")
    return out


# ---- the bench's RL loop for the baselines ----------------------------------------------------

class BowCost(torch.nn.Module):
    """P(unsafe | response) = sigmoid(w . bow(response) + b), fit on the safety labels of the preference data."""

    def __init__(self, dim: int = 1024):
        super().__init__()
        self.dim, self.lin = dim, torch.nn.Linear(dim, 1)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.lin(S.bow_features(texts, self.dim)).squeeze(-1))


def fit_cost(rows: list[dict]) -> BowCost:
    texts = [r[f"response_{i}"] for r in rows for i in (0, 1)]
    y = torch.tensor([0.0 if r[f"is_response_{i}_safe"] else 1.0 for r in rows for i in (0, 1)])
    m = BowCost()
    x = S.bow_features(texts, m.dim)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(200):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m.lin(x).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def crowd_cost(work: Path, w: Path, base: Path, imb: int):
    """`train-cost --crowd` on the panel's crowd labels (from the SFT policy); returns c(prompts, answers) = its cost score."""
    from safealign.models.generation import load_scorer, score_texts

    out = work / f"crowdcost-{imb}"
    if not (out / "report.json").is_file():
        run("train-cost", "--crowd", "--no-crowd-baseline", "--model", base, "--data", w / "preferences.jsonl", "--output-dir", out,
            "--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--max-length", "64", "--save-steps", "0", "--seed", "0")
    scorer, tok = load_scorer(str(out))

    def cost(prompts: list[str], answers: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return score_texts(scorer, tok, prompts, answers, template="default", max_length=64)
    return cost


def pooled_reward(latent: Path):
    from safetensors.torch import load_file

    from safealign.models.skills import PooledBT

    cfg = json.loads((latent / "latent.json").read_text())
    m = PooledBT(cfg["features"], cfg["hidden"])
    m.load_state_dict(load_file(str(latent / "pooled.safetensors")))
    return lambda texts: m(S.bow_features(texts, cfg["bow_dim"])).detach()


def zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / (x.std() + 1e-6)


def evaluate(lm, tok, zp, z, prompts: list[str], task: dict, seed: int) -> dict:
    from safealign.data.templates import effective_template
    from safealign.models.generation import encode_prompts
    from safealign.models.skills import sample_with_prefix
    from safealign.runtime.seeds import EVAL_STEP_OFFSET, seed_sampling

    batch = [p for p in prompts for _ in range(EVAL_SAMPLES)]
    ids = encode_prompts(tok, batch, effective_template("default", tok))
    seed_sampling(seed, EVAL_STEP_OFFSET)
    prefix = zp(z.expand(len(batch), -1) if z.dim() == 1 else z.repeat_interleave(EVAL_SAMPLES, 0)) if zp is not None else None
    with torch.no_grad():
        gen = sample_with_prefix(lm, prefix, ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=MAX_NEW, temperature=1.0)
    answers = [tok.decode([t for t in g if t != tok.eos_token_id], skip_special_tokens=True).strip() for g in gen]
    r = [task_reward(task[p], a) for p, a in zip(batch, answers)]
    c = [float(oracle(p, a).unsafe) for p, a in zip(batch, answers)]
    return {"task_return": round(sum(r) / len(r), 4), "harm_rate": round(sum(c) / len(c), 4)}


def rl_baseline(sft_dir: Path, prompts: list[str], task: dict, reward_fn, seed: int = 0, lagrangian=None) -> tuple:
    """RLOO REINFORCE on LoRA (r 8) of the SFT policy: STEPS x PROMPTS x GROUP answers; returns (lm, tok, train log)."""
    from safealign.data.templates import effective_template
    from safealign.models.generation import encode_prompts, pad
    from safealign.models.loading import apply_lora, load_causal_lm, load_tokenizer
    from safealign.models.skills import response_logprob, sample_with_prefix
    from safealign.runtime.seeds import seed_sampling
    from safealign.stages.trainer import DataOrder

    tok = load_tokenizer(str(sft_dir))
    torch.manual_seed(seed)
    lm = apply_lora(load_causal_lm(str(sft_dir), tok, dtype="fp32"), r=8, alpha=16, dropout=0.0, targets="all-linear", task="CAUSAL_LM")
    opt = torch.optim.Adam([p for p in lm.parameters() if p.requires_grad], lr=2e-3)
    order, template = DataOrder(len(prompts), seed), effective_template("default", tok)
    lam, log = (lagrangian or {}).get("init", 0.0), []
    for step in range(STEPS):
        batch = [prompts[i] for i in order.take(step * PROMPTS, PROMPTS) for _ in range(GROUP)]
        pids = encode_prompts(tok, batch, template)
        seed_sampling(seed, step)
        lm.eval()
        gen = sample_with_prefix(lm, None, pids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=MAX_NEW, temperature=1.0)
        answers = [tok.decode([t for t in g if t != tok.eos_token_id], skip_special_tokens=True).strip() for g in gen]
        r_task = torch.tensor([task_reward(task[p], a) for p, a in zip(batch, answers)])
        if lagrangian is not None:
            c = lagrangian["cost"](batch, answers).detach()
            r = r_task - lam * c
            lam = max(0.0, lam + LAMBDA_LR * (float(c.mean()) - lagrangian["limit"]))
        else:
            r = reward_fn(r_task, answers)
        adv, _ = ADV.estimate("rloo", r[:, None], torch.ones(len(batch), 1), group_size=GROUP)
        seqs = [p + g for p, g in zip(pids, gen)]
        ids, mask = pad(seqs, tok.pad_token_id)
        lm.train()
        lp = response_logprob(lm, None, ids, mask, torch.tensor([len(p) for p in pids]))
        loss = -(adv[:, 0] * lp).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        log.append({"step": step + 1, "task": float(r_task.mean()), "harm": sum(float(oracle(p, a).unsafe) for p, a in zip(batch, answers)) / len(batch),
                    "lambda": lam})
    return lm.eval(), tok, log


def panel(work: Path, imb: int, budget_s: float = 1e9) -> dict:
    path = work / f"panel-{imb}.json"
    t0 = time.time()
    w, base = world(work, imb), sft(work)
    task = {r["prompt"]: r for r in read_jsonl(w / "task.jsonl")}
    train = [r["prompt"] for r in read_jsonl(w / "prompts_train.jsonl")]
    evalp = [r["prompt"] for r in read_jsonl(w / "prompts_eval.jsonl")]
    lat = work / f"latent-{imb}"
    if path.is_file():
        res = json.loads(path.read_text())
    else:
        res = skills_panel(work, w, base, imb, task, evalp)
    partial = work / f"panel-{imb}.partial.json"
    if partial.is_file():
        res["methods"].update(json.loads(partial.read_text()))
    pooled = pooled_reward(lat)
    combo = lambda om: lambda r, a: (1 - om) * zscore(r) + om * zscore(pooled(a))  # noqa: E731
    oracle_cost = lambda: (lambda m: lambda prompts, answers: m(answers))(fit_cost(read_jsonl(w / "preferences.jsonl")))  # noqa: E731
    # the method table: name -> (reward of r_task and answers, or None for a Lagrangian; the Lagrangian's cost factory and limit)
    todo = [("task-only RL", lambda r, a: r, None)]
    todo += [(f"reward combination w={om}", combo(om), None) for om in OMEGAS]
    todo += [(ORACLE_LAG, None, (oracle_cost, COST_LIMIT)), (CROWD_LAG, None, (lambda: crowd_cost(work, w, base, imb), 0.0))]
    for name, fn, lag_spec in todo:
        if name in res["methods"]:
            continue
        if time.time() - t0 > budget_s:
            raise SystemExit(f"time budget spent; {name} and after are left: run the same command again to continue")
        t1 = time.time()
        lag = {"cost": lag_spec[0](), "limit": lag_spec[1], "init": 1.0} if lag_spec else None
        lm, tk, log = rl_baseline(base, train, task, fn, lagrangian=lag)
        om = float(name.split("w=")[1]) if name.startswith("reward combination") else None
        res["methods"][name] = {**evaluate(lm, tk, None, None, evalp, task, 0), "train_last": log[-1], "seconds": round(time.time() - t1, 1),
                                **({"omega": om} if om is not None else {})}
        done = {k: v for k, v in res["methods"].items() if k in {t[0] for t in todo}}
        partial.write_text(json.dumps(done, indent=1))
    res["seconds_last_call"] = round(time.time() - t0, 1)
    path.write_text(json.dumps(res, indent=1))
    return res


def skills_panel(work: Path, w: Path, base: Path, imb: int, task: dict, evalp: list[str]) -> dict:
    """The SFT start and the skills route (crowd latent -> skills -> compose), evaluated."""
    from safealign.models.loading import load_causal_lm, load_tokenizer
    from safealign.models.skills import load_zprefix

    res: dict = {"imbalance": imb, "methods": {}}
    tok = load_tokenizer(str(base))
    sft_lm = load_causal_lm(str(base), tok, dtype="fp32").eval()
    res["methods"]["sft (start)"] = evaluate(sft_lm, tok, None, None, evalp, task, 0)
    lat, sk, cp = work / f"latent-{imb}", work / f"skills-{imb}", work / f"compose-{imb}"
    if not (lat / "report.json").is_file():
        run("crowd", "latent", "--data", w / "preferences.jsonl", "--output-dir", lat)
    if not (sk / "report.json").is_file():
        run("crowd", "skills", "--model", base, "--latent", lat, "--data", w / "preferences.jsonl", "--output-dir", sk, "--max-steps", "400",
            "--lr", "2e-3", "--beta", "0.5", "--eval-prompts", w / "prompts_eval.jsonl", "--eval-samples", "60", "--save-steps", "0")
    if not (cp / "report.json").is_file():
        run("crowd", "compose", "--skills", sk, "--task", w / "task.jsonl", "--prompts", w / "prompts_train.jsonl", "--eval-prompts",
            w / "prompts_eval.jsonl", "--output-dir", cp, "--max-steps", STEPS, "--batch-size", PROMPTS, "--group-size", GROUP, "--lr", "0.1",
            "--save-steps", "0")
    skills_lm, zp = load_causal_lm(str(sk), load_tokenizer(str(sk)), dtype="fp32").eval(), load_zprefix(sk)
    sk_json = json.loads((sk / "skills.json").read_text())
    from safetensors.torch import load_file

    from safealign.models.skills import HighLevelPolicy

    hl_cfg = json.loads((cp / "high_level.json").read_text())
    hl = HighLevelPolicy(hl_cfg["bow_dim"], hl_cfg["z_dim"], 1.0)
    hl.load_state_dict(load_file(str(cp / "high_level.safetensors")))
    mu, sigma = torch.tensor(sk_json["prior"]["mu"]), torch.tensor(sk_json["prior"]["sigma"])
    with torch.no_grad():
        z = S.squash_to_prior(hl(S.bow_features(evalp, hl_cfg["bow_dim"])), mu, sigma, hl_cfg["squash_scale"])
    res["methods"]["skills (compose)"] = evaluate(skills_lm, tok, zp, z, evalp, task, 0)
    res["methods"]["skills at prior mean"] = evaluate(skills_lm, tok, zp, mu, evalp, task, 0)
    for a, v in sorted(sk_json["annotators"].items()):
        res["methods"][f"skill {a}"] = evaluate(skills_lm, tok, zp, torch.tensor(v["z"]), evalp, task, 0)
    lat_rep = json.loads((lat / "report.json").read_text())
    res["latent"] = {"heldout": lat_rep["heldout"], "z_separation": lat_rep["z_separation"]}
    return res


def table_order(methods: dict) -> list[str]:
    """The skills route as evaluated, then task-only RL, reward combination by w, the two Lagrangians."""
    rank = lambda n: (1, 0.0) if n == "task-only RL" else (2, methods[n]["omega"]) if n.startswith("reward combination") else \
        (3, 0.0) if n == ORACLE_LAG else (4, 0.0) if n == CROWD_LAG else (0, 0.0)  # noqa: E731
    return sorted(methods, key=rank)


def write_report(work: Path, out_md: Path, out_png: Path, argv: str) -> None:
    panels = [json.loads((work / f"panel-{i}.json").read_text()) for i in IMBALANCES if (work / f"panel-{i}.json").is_file()]
    for p in panels:
        p["methods"] = {n: p["methods"][n] for n in table_order(p["methods"])}
    lines = ["# Safe crowd skills vs reward combination (crowd world, oracle-judged)", "",
             "Produced by (each panel under the CPU lock, then the report):", "", "```", *argv.splitlines(), "```", "",
             "Each number: mean over the world's 60 held-out prompts x 2 samples (temperature 1). Task return = the task reward "
             "(aspect_2 > aspect_0 > aspect_1, +0.25 for harmful detail); harm = oracle unsafe rate. Budget: 640 generated answers "
             "for every RL method (20 steps x 8 prompts x 4). Crowd cost Lagrangian = `train-cost --crowd` (crowd labels only) as the "
             "cost of the same Lagrangian loop as the oracle's, constraint E[cost] <= 0 (ppo-lag's default threshold).", ""]
    for p in panels:
        lat = p["latent"]
        lines += [f"## Imbalance {p['imbalance']}:1", "",
                  f"VPL held-out accuracy {lat['heldout']['overall']['vpl_accuracy']:.3f} vs pooled BT {lat['heldout']['overall']['pooled_accuracy']:.3f}; "
                  f"per user " + ", ".join(f"{a}: {v['vpl_accuracy']:.3f} vs {v['pooled_accuracy']:.3f}" for a, v in lat["heldout"]["per_annotator"].items())
                  + f"; z identity accuracy {lat['z_separation']['identity_accuracy']:.2f}.", "",
                  "| method | task return | oracle harm rate |", "| --- | ---: | ---: |"]
        for name, m in p["methods"].items():
            lines.append(f"| {name} | {m['task_return']:.3f} | {m['harm_rate']:.3f} |")
        lines += [""]
    lines += ["![task return vs oracle harm](crowd_skills.png)", ""]
    out_md.write_text("\n".join(lines))
    from safealign.runtime import plots

    plt = plots._plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 3, 4.2), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], panels):
        for name, m in p["methods"].items():
            if name.startswith("reward combination"):
                continue
            marker = {"skills (compose)": ("*", 180, "tab:green"), "task-only RL": ("s", 60, "tab:red"), "sft (start)": ("o", 50, "gray")}.get(
                name, ("^", 60, "tab:purple") if name == ORACLE_LAG else ("v", 60, "tab:orange") if name == CROWD_LAG else ("x", 40, "tab:olive"))
            ax.scatter(m["harm_rate"], m["task_return"], marker=marker[0], s=marker[1], color=marker[2], label=name, zorder=3)
        combo = [(m["omega"], m["harm_rate"], m["task_return"]) for n, m in p["methods"].items() if n.startswith("reward combination")]
        ax.plot([c[1] for c in combo], [c[2] for c in combo], "-o", color="tab:blue", ms=4, label="reward combination (w 0..1)")
        for om, x, y in combo:
            if om in (0.0, 0.5, 1.0):
                ax.annotate(f"w={om}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"imbalance {p['imbalance']}:1")
        ax.set_xlabel("oracle harm rate (held-out prompts)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("task return")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))   # outside: no point hidden
    plots._save(fig, out_png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imbalance", type=int, choices=IMBALANCES)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--budget-s", type=float, default=480, help="stop (resumably) before starting a run after this many seconds")
    ap.add_argument("--work", type=Path, default=Path("/tmp/safealign-crowd-skills-bench"))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.imbalance:
        p = panel(a.work, a.imbalance, a.budget_s)
        for name, m in p["methods"].items():
            print(f"{name:55s} task {m['task_return']:.3f}  harm {m['harm_rate']:.3f}")
    if a.report:
        argv = "\n".join([f".venv/bin/python bench/crowd_skills.py --imbalance {i}" for i in IMBALANCES] + [".venv/bin/python bench/crowd_skills.py --report"])
        write_report(a.work, REPO / "bench" / "results" / "crowd_skills.md", REPO / "bench" / "results" / "crowd_skills.png", argv)
        print("wrote bench/results/crowd_skills.md")


if __name__ == "__main__":
    main()
