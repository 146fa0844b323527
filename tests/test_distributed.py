"""Multi-process runs on CPU (2 processes, gloo): DDP and DeepSpeed ZeRO-2/3 through accelerate.

With the same global batch and seed, the loss curve of a 2-process run matches the 1-process run;
only rank 0 writes; the process exits 0 (no gloo abort at teardown); a ZeRO-3 save is complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_train_e2e import pairs_file

pytestmark = pytest.mark.dist
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEALIGN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_extensions")}
BIN = Path(sys.executable).parent


def kill_launch(pid: int) -> None:
    """SIGKILL a launcher and every process under it. torch's elastic agent starts each worker in a
    session of its own, so killing the launcher's process group alone leaves the workers training."""
    import signal

    def children(p: int) -> list[int]:
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == p:
                kids.append(int(stat.parent.name))
        return kids

    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children(p)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def losses(out: Path) -> list[float]:
    return [r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


def run(cmd: list, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    data = pairs_file(tmp / "pairs.jsonl", 128)
    out = tmp / "single"
    run([sys.executable, "-m", "safealign", "train-rm", "--data", data, "--output-dir", out, "--max-steps", "8", "--batch-size", "16",
         "--eval-split", "0.25", "--log-steps", "1", "--lr", "2e-3"])
    return data, out


ARGS = ["--max-steps", "8", "--batch-size", "8", "--eval-split", "0.25", "--log-steps", "1", "--lr", "2e-3"]


def test_torchrun_ddp_matches_single_process(single, tmp_path):
    data, ref = single
    out = tmp_path / "ddp"
    run([BIN / "torchrun", "--nproc_per_node", "2", "-m", "safealign", "train-rm", "--data", data, "--output-dir", out, *ARGS])
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["distributed"] == "MULTI_CPU"
    assert losses(out) == pytest.approx(losses(ref), abs=1e-4)
    assert report["eval"]["eval/pairs"] == json.loads((ref / "report.json").read_text())["eval"]["eval/pairs"]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_accelerate_deepspeed_matches_single_process(single, tmp_path, zero):
    data, ref = single
    out = tmp_path / zero
    run([BIN / "accelerate", "launch", "--config_file", REPO / "recipes" / "accelerate" / f"{zero}.yaml", "-m", "safealign", "train-rm",
         "--data", data, "--output-dir", out, "--save-steps", "4", *ARGS])
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["distributed"] == "DEEPSPEED"
    assert losses(out) == pytest.approx(losses(ref), abs=1e-4)
    assert report["reload_check"]["ok"]  # the gathered save loads with plain transformers and scores like the trained model
    assert (out / "checkpoints" / "step-00000004" / "state.json").exists()


def test_deepspeed_zero3_sigkill_and_resume_from_sharded_checkpoint(single, tmp_path):
    import time

    data, _ = single
    args = ["--max-steps", "30", "--batch-size", "8", "--eval-split", "0", "--log-steps", "1", "--lr", "2e-3", "--save-steps", "3"]
    ref = tmp_path / "ref"
    run([sys.executable, "-m", "safealign", "train-rm", "--data", data, "--output-dir", ref, *[a if a != "8" else "16" for a in args]])
    out = tmp_path / "z3"
    launch = [BIN / "accelerate", "launch", "--config_file", REPO / "recipes" / "accelerate" / "zero3.yaml", "-m", "safealign", "train-rm",
              "--data", data, "--output-dir", out, *args]
    proc = subprocess.Popen([str(c) for c in launch], env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints" / "step-00000006" / "state.json").exists():
        time.sleep(0.05)
    kill_launch(proc.pid)
    proc.wait()
    time.sleep(1)
    assert not (out / "report.json").exists(), "finished before the kill"
    run([*launch, "--resume"])
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_step"] >= 6 and report["steps"] == 30
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))
    assert losses(out) == pytest.approx(losses(ref), abs=1e-4)  # same curve as one uninterrupted single process


def test_world_size_mismatch_is_refused():
    from safealign.errors import BadInput
    from safealign.runtime import dist

    class FakeAcc:
        num_processes = 1

    with pytest.raises(BadInput, match="did not join one process group"):
        dist.check_world(FakeAcc(), world=2)


def rl_run(head: list, out: Path, world, tiny_policy, tiny_rm, tiny_cm, algorithm: str, *extra) -> list[dict]:
    """A 3-step 2-process RL run; its metrics rows. Checks what every launcher must give: one report
    (rank 0), lambda identical on the ranks and rising (costs above the threshold), the ranks in sync."""
    group = ["--group-size", "2", "--batch-size", "2"] if algorithm == "grpo-lag" else ["--batch-size", "4"]
    run([*head, "-m", "safealign", "ppo-lag", "--model", tiny_policy, "--reward-model", tiny_rm, "--cost-model", tiny_cm,
         "--data", world / "prompts_train.jsonl", "--output-dir", out, "--max-steps", "3", "--max-new-tokens", "8",
         "--threshold", "-5", "--log-steps", "1", "--algorithm", algorithm, *group, *extra])
    report = json.loads((out / "report.json").read_text())
    assert report["algorithm"] == algorithm
    assert report["world_size"] == 2
    assert report["ranks_in_sync"] is True  # lambda and the actor's parameters are identical on both ranks
    assert report["reload_check"]["ok"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lam = [r["lambda"] for r in rows if "lambda" in r]
    assert len(lam) == 3 and lam[-1] > lam[0]  # costs above the threshold raise lambda on every rank alike
    assert not list(out.glob("rank*")), "only rank 0 writes"
    return rows


@pytest.mark.parametrize("launcher,algorithm", [("torchrun", "ppo-lag"), ("zero2", "ppo-lag"), ("zero3", "ppo-lag"), ("torchrun", "grpo-lag")])
def test_rl_two_processes_agree_on_lambda(world, tiny_policy, tiny_rm, tiny_cm, tmp_path, launcher, algorithm):
    """zero3: rollouts from the actor gathered once per rollout (the default), and the ranks finish
    (a reload check that generated on rank 0 alone once waited for rank 1 for ever: transformers
    syncs generate() across processes whenever a ZeRO-3 run is active). Sampling from the gathered
    copy draws the same tokens as sampling from the shards with the same seeds: every step's reward,
    cost, response length, KL, lambda and loss equal those of the --no-zero3-gather run."""
    if launcher == "torchrun":
        head = [BIN / "torchrun", "--nproc_per_node", "2"]
    else:
        head = [BIN / "accelerate", "launch", "--config_file", REPO / "recipes" / "accelerate" / f"{launcher}.yaml"]
    rows = rl_run(head, tmp_path / "rl", world, tiny_policy, tiny_rm, tiny_cm, algorithm)
    if launcher == "zero3":
        sharded = rl_run(head, tmp_path / "sharded", world, tiny_policy, tiny_rm, tiny_cm, algorithm, "--no-zero3-gather")
        from safetensors.torch import load_file

        keys = ["reward", "cost", "response_length", "response_length_max", "eos_rate", "kl", "lambda", "train/policy_loss",
                "eval/reward", "eval/cost"]
        pick = lambda rs: [{k: r[k] for k in keys if k in r} for r in rs if "lambda" in r or "eval/reward" in r]  # noqa: E731
        a, b = pick(rows), pick(sharded)
        assert len(a) == len(b) >= 3 and all(x.keys() == y.keys() and "reward" in x for x, y in zip(a[:3], b[:3]))
        for x, y in zip(a, b):
            assert x == pytest.approx(y, abs=1e-5)
        w = lambda out: {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}  # noqa: E731
        wg, ws = w(tmp_path / "rl"), w(tmp_path / "sharded")
        assert wg and wg.keys() == ws.keys()
        assert max(float((wg[k].float() - ws[k].float()).abs().max()) for k in wg) < 1e-6   # the same updates from the same samples
