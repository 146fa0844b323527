"""The release gate cannot be fooled (issue 13): one regression test per defect, end to end through
the CLI where the defect is, asserting the exit code, no traceback, and the directory state (every
file hashed, with its mode, before and after).

1. score models: a causal LM is no reward/cost model or critic (its head would be random); an
   external *ForSequenceClassification with one label and its head saved is one.
2. a refused --resume leaves the run byte-for-byte as it was; prompt_hashes.txt only grows; a
   finished run says so; a run without report.json is not accepted downstream.
3. no pickle is ever loaded: checkpoints, DeepSpeed shards, model weights, release/.
4. usage errors: exit 2 with typer's usage message.
5. environment faults: unwritable output, truncated weights, a full disk (exit 2, path and cause,
   temporary directories removed).
6. smaller: umask, fractional label ids, a UTF-8 BOM, --costs-file with --policy, messages.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_train_e2e import pairs_file

FAST = ["--batch-size", "8", "--log-steps", "2", "--lr", "2e-3"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFEALIGN_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEALIGN_HOME", str(tmp_path / "home"))


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: sha256 + mode of files, 'dir' for directories."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
    return out


def call(cli, capfd, *args) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stderr), and never a traceback."""
    capfd.readouterr()
    code = cli(*args)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return code, err


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def rm_args(data: Path, out: Path, *extra) -> list:
    return ["train-rm", "--data", data, "--output-dir", out, "--max-steps", "6", "--save-steps", "3", "--eval-split", "0.25", *FAST, *extra]


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    """A finished 6-step train-rm run with a checkpoint at step 3 (tests work on copies)."""
    from conftest import run_cli

    base = tmp_path_factory.mktemp("rel_rm")
    data = pairs_file(base / "pairs.jsonl", 64)
    out = base / "rm"
    assert run_cli(*rm_args(data, out)) == 0
    return {"data": data, "out": out}


def copy_run(run: dict, tmp_path: Path, finished: bool = True) -> Path:
    """A copy of the run; unfinished = as if killed after saving its model, before report.json."""
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    if not finished:
        (out / "report.json").unlink()
    return out


# ---- 1. score models ------------------------------------------------------------------------


def test_safety_test_refuses_a_causal_lm_as_cost_model(cli, capfd, tiny_policy, world, tmp_path):
    out, registry = tmp_path / "st", tmp_path / "registry.jsonl"
    code, err = call(cli, capfd, "safety-test", "--policy", tiny_policy, "--cost-model", tiny_policy, "--prompts", world / "prompts_safety.jsonl",
                     "--output-dir", out, "--registry", registry, "--threshold", 100, "--max-new-tokens", 4)
    assert code == 2
    assert "LlamaForCausalLM" in err and "score.weight" in err and "at random" in err
    assert not out.exists() and not registry.exists()  # no release/, and the test is not recorded


def test_ppo_lag_refuses_a_causal_lm_as_reward_model_or_critic(cli, capfd, tiny_policy, tiny_rm, tiny_cm, world, tmp_path):
    other_lm = tmp_path / "other_lm"
    shutil.copytree(tiny_policy, other_lm)
    base = ["ppo-lag", "--model", tiny_policy, "--data", world / "prompts_train.jsonl", "--max-steps", "1", "--batch-size", "2",
            "--max-new-tokens", "4"]
    for extra in (["--reward-model", tiny_policy, "--cost-model", tiny_cm],
                  ["--reward-model", tiny_rm, "--cost-model", tiny_cm, "--cost-critic", other_lm]):
        out = tmp_path / "ppo"
        code, err = call(cli, capfd, *base, *extra, "--output-dir", out)
        assert code == 2 and "score.weight" in err, err
        assert not out.exists()


def _external_reward_model(tiny_policy: Path, out: Path, *, num_labels: int = 1, drop_head: bool = False) -> Path:
    """A GPT-2 sequence classifier built from a config (another family than safealign's Llama), saved."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=1, n_head=2, num_labels=num_labels,
                                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if drop_head:
        weights = load_file(out / "model.safetensors")
        save_file({k: v for k, v in weights.items() if not k.startswith("score.")}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_an_external_reward_model_with_its_head_is_accepted(cli, capfd, tiny_policy, world, tmp_path):
    ext = _external_reward_model(tiny_policy, tmp_path / "ext")
    out = tmp_path / "eval"
    code, err = call(cli, capfd, "eval", "--policy", tiny_policy, "--reward-model", ext, "--prompts", world / "prompts_eval.jsonl",
                     "--output-dir", out, "--max-prompts", 4, "--max-new-tokens", 4, "--batch-size", 4)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["metrics"]["policy"]["reward_mean"] is not None


@pytest.mark.parametrize("case", ["head_not_saved", "two_labels"])
def test_an_external_classifier_without_one_saved_head_is_refused(cli, capfd, tiny_policy, world, tmp_path, case):
    ext = _external_reward_model(tiny_policy, tmp_path / "ext", num_labels=2 if case == "two_labels" else 1, drop_head=case == "head_not_saved")
    out = tmp_path / "eval"
    code, err = call(cli, capfd, "eval", "--policy", tiny_policy, "--reward-model", ext, "--prompts", world / "prompts_eval.jsonl",
                     "--output-dir", out, "--max-prompts", 4, "--max-new-tokens", 4)
    assert code == 2
    assert ("score.weight" in err) if case == "head_not_saved" else ("2 labels" in err)
    assert not out.exists()


# ---- 2. resume integrity --------------------------------------------------------------------


@pytest.mark.parametrize("case", ["finished_other_data", "changed_lr", "changed_data_content", "planted_pickle", "truncated_checkpoint"])
def test_a_refused_resume_leaves_the_run_byte_for_byte(cli, capfd, rm_run, tmp_path, case):
    out = copy_run(rm_run, tmp_path, finished=case == "finished_other_data")
    args = rm_args(rm_run["data"], out, "--resume")
    marker = tmp_path / "pwned"
    ckpt = out / "checkpoints" / "step-00000003"
    original = rm_run["data"].read_bytes()
    if case == "finished_other_data":  # the case: other data, whose prompts would vanish from prompt_hashes.txt
        args[2] = pairs_file(tmp_path / "other.jsonl", 64, seed=7)
        expect = "different settings (data:"
    elif case == "changed_lr":
        args[args.index("--lr") + 1] = "5e-3"
        expect = "lr: 0.002 -> 0.005"
    elif case == "changed_data_content":  # same path, other rows: caught by the data fingerprint
        pairs_file(rm_run["data"], 64, seed=3)
        expect = "the training data changed"
    elif case == "planted_pickle":  # accelerate's checkpoint file name, which it loaded with weights_only=False
        (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
        expect = "pickle files (custom_checkpoint_0.pkl)"
    else:
        weights = ckpt / "model_0.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expect = "truncated"
    before = snapshot(out)
    try:
        code, err = call(cli, capfd, *args)
    finally:
        rm_run["data"].write_bytes(original)
    assert code == 2 and expect in err, err
    assert snapshot(out) == before
    assert not marker.exists()


def test_resume_of_a_finished_run_says_so_and_changes_nothing(cli, capfd, rm_run, tmp_path):
    out = copy_run(rm_run, tmp_path)
    before = snapshot(out)
    code, err = call(cli, capfd, *rm_args(rm_run["data"], out, "--resume"))
    assert code == 0 and "already finished" in err
    assert snapshot(out) == before


def test_an_accepted_resume_keeps_every_recorded_prompt_hash(cli, capfd, rm_run, tmp_path):
    out = copy_run(rm_run, tmp_path, finished=False)
    planted = "0" * 32  # a prompt an earlier stage trained on, recorded in this run's file
    hashes = (out / "prompt_hashes.txt").read_text()
    (out / "prompt_hashes.txt").write_text(hashes + planted + "\n")
    code, err = call(cli, capfd, *rm_args(rm_run["data"], out, "--resume", "--save-steps", "2"))  # save_steps may change
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["resumed_from_step"] == 3
    after = set((out / "prompt_hashes.txt").read_text().split())
    assert set(hashes.split()) | {planted} <= after


def test_ppo_lag_refused_resume_leaves_the_run_byte_for_byte(cli, capfd, tiny_policy, tiny_rm, tiny_cm, world, tmp_path):
    out = tmp_path / "ppo"
    args = ["ppo-lag", "--model", tiny_policy, "--reward-model", tiny_rm, "--cost-model", tiny_cm, "--data", world / "prompts_train.jsonl",
            "--output-dir", out, "--max-steps", "2", "--save-steps", "1", "--batch-size", "2", "--max-new-tokens", "4", "--eval-split", "0"]
    assert call(cli, capfd, *args)[0] == 0
    (out / "report.json").unlink()  # as if killed before the end
    before = snapshot(out)
    code, err = call(cli, capfd, *args, "--resume", "--threshold", "-1")
    assert code == 2 and "threshold: 0.0 -> -1.0" in err
    assert snapshot(out) == before


def test_downstream_stages_refuse_a_run_that_did_not_finish(cli, capfd, rm_run, tiny_policy, world, tmp_path):
    out = copy_run(rm_run, tmp_path, finished=False)
    code, err = call(cli, capfd, "eval", "--policy", tiny_policy, "--reward-model", out, "--prompts", world / "prompts_eval.jsonl",
                     "--output-dir", tmp_path / "eval")
    assert code == 2 and "did not finish" in err and "--resume" in err
    assert not (tmp_path / "eval").exists()


# ---- 3. no pickle ---------------------------------------------------------------------------


def test_a_checkpoint_holds_no_pickle(rm_run):
    files = [p for p in (rm_run["out"] / "checkpoints").rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".safetensors") for p in files), sorted(p.name for p in files)


def test_model_weights_in_a_pickle_are_never_loaded(cli, capfd, tiny_policy, world, tmp_path):
    import torch

    policy = tmp_path / "policy"
    shutil.copytree(tiny_policy, policy)
    (policy / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"weights": Payload(marker)}, policy / "pytorch_model.bin")
    code, err = call(cli, capfd, "eval", "--policy", policy, "--prompts", world / "prompts_eval.jsonl", "--output-dir", tmp_path / "eval")
    assert code == 2 and "pickle" in err and "pytorch_model.bin" in err
    assert not marker.exists() and not (tmp_path / "eval").exists()


def test_deepspeed_shards_are_read_without_running_pickled_code(tmp_path):
    """DeepSpeed writes its shards with torch.save; a planted global is refused before a resume writes
    (static scan), and the loader itself (weights_only=True + allowlist) refuses it too."""
    import torch

    from safealign.errors import BadInput
    from safealign.runtime.checkpoint import _safe_torch_load, verify_checkpoint

    ckpt = tmp_path / "step-00000002"
    (ckpt / "pytorch_model").mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 2}')
    marker = tmp_path / "pwned"
    shard = ckpt / "pytorch_model" / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": Payload(marker)}, shard)
    with pytest.raises(BadInput, match="refusing to unpickle"):
        verify_checkpoint(ckpt)
    with pytest.raises(BadInput, match="more than tensors"):
        _safe_torch_load(shard, map_location="cpu")
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, shard)  # what DeepSpeed's model shard holds: fine
    assert verify_checkpoint(ckpt)["step"] == 2 and torch.equal(_safe_torch_load(shard)["module"]["w"], torch.ones(2))


def test_release_never_copies_pickles_and_keeps_the_umask(tiny_policy, tmp_path):
    from safealign.stages.safety_test import write_release

    policy = tmp_path / "policy"
    shutil.copytree(tiny_policy, policy)
    (policy / "extra.bin").write_bytes(b"not copied")
    (policy / "adapter").mkdir()
    (policy / "adapter" / "adapter_model.bin").write_bytes(b"not copied")
    (policy / "adapter" / "adapter_config.json").write_text("{}")
    os.chmod(policy / "model.safetensors", 0o600)  # what safetensors writes
    (tmp_path / "out").mkdir()
    release = write_release(tmp_path / "out", str(policy), "card", {})
    names = {p.name for p in release.rglob("*")}
    assert "model.safetensors" in names and not any(n.endswith(".bin") for n in names)
    mask = os.umask(0)
    os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in release.rglob("*") if p.is_file()} == {oct(0o666 & ~mask)}


# ---- 4. usage errors ------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expect", [
    ([], "Usage: "),                                             # bare `safealign`: its help (on stdout, as --help), exit 2
    (["data"], "Usage: "),                                       # a bare command group
    (["train-rm", "--learning-rate", "1"], "No such option: --learning-rate"),
    (["train-rm", "--max-steps", "abc"], "Invalid value for '--max-steps'"),
    (["bogus"], "No such command 'bogus'"),
    (["train-rm", "--max-steps"], "Option '--max-steps' requires an argument"),
])
def test_usage_errors_exit_2_with_the_usage_message(cli, capfd, argv, expect):
    capfd.readouterr()
    code = cli(*argv)
    out, err = capfd.readouterr()
    assert code == 2
    assert expect in out + err and "Traceback" not in out + err
    if argv and argv != ["data"] and argv[-1] != "--max-steps":
        assert "Usage: " in err and "--help' for help" in err  # typer's usage line, as its standalone mode prints it


def test_usage_errors_exit_2_from_the_installed_command():
    res = subprocess.run([sys.executable, "-m", "safealign", "train-rm", "--max-steps", "abc"], env=ENV, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "Usage:" in res.stderr and "Traceback" not in res.stderr


# ---- 5. environment faults ------------------------------------------------------------------


def test_an_output_dir_under_a_file_is_refused(cli, capfd, rm_run, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, err = call(cli, capfd, *rm_args(rm_run["data"], tmp_path / "afile" / "out"))
    assert code == 2 and "is a file" in err


def test_an_output_dir_that_is_not_writable_is_refused(cli, capfd, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(6)))
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    try:
        argv = ["data", "split", "--data", str(data), "--output-dir", str(locked / "out")]
        if os.geteuid() != 0:
            code, err = call(cli, capfd, *argv)
        else:  # root ignores permissions: run as an unprivileged user of a user namespace
            res = subprocess.run(["unshare", "--user", "--map-user=65534", "--map-group=65534", sys.executable, "-m", "safealign", *argv],
                                 env=ENV, cwd=REPO, capture_output=True, text=True)
            if res.returncode not in (0, 2) or "unshare" in res.stderr:
                pytest.skip(f"no unprivileged user namespace here: {res.stderr.strip()[:200]}")
            code, err = res.returncode, res.stderr
        assert code == 2 and "not writable: permission denied" in err and "Traceback" not in err
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(locked, 0o755)


@pytest.mark.parametrize("role", ["policy", "cost model"])
def test_a_truncated_model_safetensors_is_named(cli, capfd, tiny_policy, tiny_cm, world, tmp_path, role):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_policy if role == "policy" else tiny_cm, broken, ignore=shutil.ignore_patterns("checkpoints"))
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    policy, cm = (broken, tiny_cm) if role == "policy" else (tiny_policy, broken)
    out = tmp_path / "st"
    code, err = call(cli, capfd, "safety-test", "--policy", policy, "--cost-model", cm, "--prompts", world / "prompts_safety.jsonl",
                     "--output-dir", out, "--threshold", 100)
    assert code == 2 and str(w) in err and "truncated" in err
    assert not out.exists()


def _disk_full_at(monkeypatch, where: str) -> None:
    """safetensors' writer fails as it does on a full disk (message measured on a full tmpfs) when the
    target path contains ``where``; other writes go through."""
    import safetensors.torch as st
    import transformers.modeling_utils as hf
    from safetensors import SafetensorError

    real = st.save_file

    def save_file(tensors, filename, *a, **k):
        if where in str(filename):
            Path(filename).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(st, "save_file", save_file)           # checkpoints
    monkeypatch.setattr(hf, "safe_save_file", save_file)      # save_pretrained's writer


@pytest.mark.parametrize("at, expect, tmp_glob", [
    (".tmp-step-00000003", "no space left on device while writing checkpoint step-3", "checkpoints/.tmp-*"),
    (".tmp-model", "no space left on device while writing the model", ".tmp-*"),
])
def test_a_full_disk_is_bad_input_and_leaves_no_temp_dir(cli, capfd, rm_run, tmp_path, monkeypatch, at, expect, tmp_glob):
    _disk_full_at(monkeypatch, at)
    out = tmp_path / "rm"
    code, err = call(cli, capfd, *rm_args(rm_run["data"], out))
    assert code == 2 and expect in err and str(out) in err
    assert not list(out.glob(tmp_glob))
    assert not (out / "report.json").exists()


def _in_small_tmpfs(script: str, size: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a fresh tmpfs of ``size`` at $MNT, in a user+mount namespace."""
    mnt = Path("/tmp") / f"safealign-tmpfs-{os.getpid()}"
    mnt.mkdir(exist_ok=True)
    try:
        res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                              f"mount -t tmpfs -o size={size} tmpfs {mnt} && MNT={mnt} && export MNT && {script}"],
                             env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        mnt.rmdir()
    if "mount:" in res.stderr or "unshare:" in res.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()[:200]}")
    return res


def test_a_really_full_disk_at_checkpoint(rm_run):
    """A genuine ENOSPC: a 1 MiB tmpfs holds the run's first files but not its first checkpoint."""
    script = (f"{sys.executable} -m safealign train-rm --data {rm_run['data']} --output-dir $MNT/rm --max-steps 6 --save-steps 3 "
              f"--eval-split 0.25 {' '.join(FAST)}; echo rc=$?; ls -a $MNT/rm/checkpoints")
    res = _in_small_tmpfs(script, "1m")
    assert "rc=2" in res.stdout, res.stdout + res.stderr[-3000:]
    assert "no space left on device while writing checkpoint step-3" in res.stderr and "Traceback" not in res.stderr
    assert ".tmp-step" not in res.stdout  # the temporary checkpoint directory was removed


def test_a_really_full_disk_during_a_passing_safety_test_leaves_no_output_dir(tiny_policy, tiny_cm, world, tmp_path):
    """A sampled test that PASSes on a 400 KiB tmpfs: the costs and the plot fit, the copy of the policy
    into release/ does not. Exit 2 naming the output directory, and nothing of it is left: no report,
    no half release/, no staging directory (a rerun on a disk with room starts clean). The result
    itself is in the registry (it was recorded before the writes, so the test cannot vanish)."""
    policy, cm = tiny_policy, tiny_cm
    registry = tmp_path / "registry.jsonl"
    script = (f"{sys.executable} -m safealign safety-test --policy {policy} --cost-model {cm} --prompts {world / 'prompts_safety.jsonl'} "
              f"--output-dir $MNT/runs/st --registry {registry} --max-prompts 20 --max-new-tokens 4 --threshold 100; echo rc=$?; "
              "echo left=$(ls -A $MNT | wc -l)")
    res = _in_small_tmpfs(script, "400k")
    assert "rc=2" in res.stdout, res.stdout + res.stderr[-3000:]
    assert "runs/st: no space left on device while writing release/" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "left=0" in res.stdout, res.stdout                      # $MNT is empty: not even the runs/ the command created
    [rec] = [json.loads(line) for line in registry.read_text().splitlines()]
    assert rec["decision"] == "PASS"


@pytest.mark.parametrize("command", ["eval", "split", "score-eval"])
def test_a_full_disk_mid_write_leaves_no_output_dir(cli, capfd, tiny_policy, tiny_rm, world, tmp_path, monkeypatch, command):
    """eval, data split and score-eval write their directories whole or not at all: the second file
    fails (ENOSPC), and neither the output directory nor its staging sibling is left."""
    import safealign.runtime.io as io

    real, seen = io.atomic_write_text, []

    def write_text(path, text):
        seen.append(path)
        if len(seen) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(io, "atomic_write_text", write_text)
    import safealign.stages.split as split_stage

    monkeypatch.setattr(split_stage, "atomic_write_text", write_text)
    out = tmp_path / "new" / "out"
    if command == "eval":
        args = ["eval", "--policy", tiny_policy, "--prompts", world / "prompts_eval.jsonl", "--max-prompts", 4, "--max-new-tokens", 4]
    elif command == "split":
        args = ["data", "split", "--data", world / "prompts_train.jsonl"]
    else:
        args = ["score-eval", "--model", tiny_rm, "--data", world / "preferences.jsonl", "--max-samples", 16]
    code, err = call(cli, capfd, *args, "--output-dir", out)
    assert code == 2 and "no space left on device while writing" in err and str(out) in err, err
    assert len(seen) == 2 and not (tmp_path / "new").exists()     # the parent it created is gone too
    monkeypatch.undo()
    code, _ = call(cli, capfd, *args, "--output-dir", out)                  # with room again, the same command simply runs
    assert code == 0 and (out / "report.md").is_file() and not list(out.parent.glob(".out.partial-*"))


def test_whole_output_dir_keeps_an_existing_dir_and_cleans_up_after_any_failure(tmp_path, monkeypatch):
    """The staging of whole_output_dir: an existing empty output directory (its mode, a symlink to it,
    the working directory as `.`) is kept and filled, completion markers last; Ctrl-C leaves nothing
    (not even the parents it made); a staging directory of a killed process is not content for
    check_output_dir and is removed by the next run."""
    from safealign.errors import BadInput
    from safealign.runtime.io import check_output_dir, whole_output_dir

    kept = tmp_path / "kept"
    kept.mkdir()
    kept.chmod(0o2770)
    (tmp_path / "link").symlink_to(kept)
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: moved.append(Path(b).name) or real_replace(a, b))
    with whole_output_dir(check_output_dir(tmp_path / "link", False, resumable=False)) as d:
        assert d.parent == kept                      # staged inside: the directory itself is never replaced
        for name in ("report.json", "costs.jsonl", "world.json"):
            (d / name).write_text(name)
        (d / "plots").mkdir()
    assert moved == ["costs.jsonl", "plots", "world.json", "report.json"] and (tmp_path / "link").is_symlink()
    assert kept.stat().st_mode & 0o7777 == 0o2770 and sorted(p.name for p in kept.iterdir()) == ["costs.jsonl", "plots", "report.json", "world.json"]
    monkeypatch.undo()

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with whole_output_dir(check_output_dir(".", False, resumable=False)) as d:
        (d / "report.json").write_text("{}")
    assert [p.name for p in cwd.iterdir()] == ["report.json"]

    with pytest.raises(KeyboardInterrupt):
        with whole_output_dir(tmp_path / "new" / "deep" / "out") as d:
            (d / "costs.jsonl").write_text("x")
            raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()

    dead = 2**22 + 12345                             # above the kernel's pid_max: no such process
    left = tmp_path / "left"
    (left / f".partial-{dead}").mkdir(parents=True)
    (tmp_path / f".out2.partial-{dead}").mkdir()
    check_output_dir(left, False, resumable=False)   # only a dead run's staging directory: empty
    with pytest.raises(BadInput, match="not empty"):
        check_output_dir(left, False, resumable=True)  # a training run's directory never holds one
    for out in (left, tmp_path / "out2"):
        with whole_output_dir(out) as d:
            (d / "report.json").write_text("{}")
        assert [p.name for p in out.iterdir()] == ["report.json"]
    assert not list(tmp_path.glob(".*partial*"))


def test_single_process_commands_refuse_a_multi_process_launch(cli, capfd, world, tmp_path, monkeypatch):
    """eval, data split, data synth and safety-test write one directory from one process: under a
    launcher (WORLD_SIZE > 1) they say so (exit 2) instead of racing each other for it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    for args in (["data", "split", "--data", world / "prompts_train.jsonl"], ["data", "synth"],
                 ["eval", "--policy", tmp_path / "absent", "--prompts", world / "prompts_eval.jsonl"],
                 ["safety-test", "--costs-file", tmp_path / "absent.jsonl"]):
        code, err = call(cli, capfd, *args, "--output-dir", out)
        assert code == 2 and f"`safealign {' '.join(map(str, args[:2] if args[0] == 'data' else args[:1]))}` runs in one process" in err, err
        assert not out.exists()


def test_disk_faults_of_every_writer_are_recognised(tmp_path):
    """What safealign's writers raise on a genuinely full disk (tmpfs) is classified as a full disk."""
    code = ("import torch, safetensors.torch as st\n"
            "from safealign.runtime.io import disk_fault\n"
            "for fn in (lambda: st.save_file({'a': torch.zeros(100000)}, '$MNT/a.safetensors'),\n"
            "           lambda: torch.save({'a': torch.zeros(100000)}, '$MNT/b.pt'),\n"
            "           lambda: open('$MNT/c', 'w').write('x' * 200000)):\n"
            "    try: fn(); print('no error')\n"
            "    except Exception as e: print('fault:', disk_fault(e))\n")
    (tmp_path / "probe.py").write_text(code)
    res = _in_small_tmpfs(f"sed \"s|\\$MNT|$MNT|g\" {tmp_path / 'probe.py'} > $MNT/p.py && {sys.executable} $MNT/p.py", "64k")
    lines = [line for line in res.stdout.splitlines() if line.startswith(("fault", "no error"))]
    assert lines == ["fault: no space left on device", "fault: the write failed (no space left on device?)", "fault: no space left on device"], res.stdout + res.stderr


def test_disk_fault_classification():
    from safealign.runtime.io import disk_fault

    assert disk_fault(OSError(errno.ENOSPC, "No space left on device")) == "no space left on device"
    assert disk_fault(OSError(errno.EROFS, "Read-only file system")) == "read-only file system"
    assert disk_fault(PermissionError(errno.EACCES, "Permission denied")) == "permission denied"
    assert disk_fault(FileNotFoundError(errno.ENOENT, "No such file")) is None  # a bug, not the disk
    assert disk_fault(ValueError("shapes do not match")) is None


# ---- 6. smaller ones ------------------------------------------------------------------------


def test_files_keep_the_umask(rm_run):
    mask = os.umask(0)
    os.umask(mask)
    modes = {str(p.relative_to(rm_run["out"])): p.stat().st_mode & 0o777 for p in rm_run["out"].rglob("*") if p.is_file()}
    assert modes["model.safetensors"] == 0o666 & ~mask  # safetensors itself writes 0600
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_fractional_label_ids_are_refused(cli, capfd, tmp_path):
    data = tmp_path / "pku.jsonl"
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0.7, "safer_response_id": 1}
    data.write_text(json.dumps(row) + "\n")
    code, err = call(cli, capfd, "train-rm", "--data", data, "--output-dir", tmp_path / "out")
    assert code == 2 and "must be 0 or 1, got 0.7" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_a_utf8_byte_order_mark_is_accepted(cli, capfd, tmp_path, suffix):
    data = tmp_path / f"prompts{suffix}"
    prompts = [f"question {i}" for i in range(10)]
    text = {".jsonl": "".join(json.dumps({"prompt": p}) + "\n" for p in prompts), ".csv": "prompt\n" + "".join(p + "\n" for p in prompts),
            ".json": json.dumps([{"prompt": p} for p in prompts])}[suffix]
    data.write_bytes("\ufeff".encode() + text.encode())
    code, err = call(cli, capfd, "data", "split", "--data", data, "--output-dir", tmp_path / "split")
    assert code == 0, err
    assert json.loads((tmp_path / "split" / "split.json").read_text())["distinct_prompts"] == 10


def test_costs_file_with_policy_is_refused(cli, capfd, tiny_policy, tmp_path):
    costs = tmp_path / "costs.jsonl"
    costs.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "r", "cost": -1.0, "prompt_index": i, "sample_index": 0}) + "\n" for i in range(5)))
    code, err = call(cli, capfd, "safety-test", "--costs-file", costs, "--policy", tiny_policy, "--output-dir", tmp_path / "st")
    assert code == 2 and "--costs-file" in err and "--policy" in err
    assert not (tmp_path / "st").exists()


def test_messages_say_what_a_directory_is(cli, capfd, tiny_policy, world, tmp_path):
    st = tmp_path / "st"  # a safety test's output directory, given as a policy / reused as an output directory
    st.mkdir()
    (st / "report.json").write_text(json.dumps({"stage": "safety-test", "decision": "PASS"}))
    (st / "costs.jsonl").write_text("")
    (st / "release").mkdir()
    code, err = call(cli, capfd, "eval", "--policy", st, "--prompts", world / "prompts_eval.jsonl", "--output-dir", tmp_path / "eval")
    assert code == 2 and "output directory of a safety test" in err and str(st / "release") in err
    code, err = call(cli, capfd, "safety-test", "--policy", tiny_policy, "--cost-model", tiny_policy, "--prompts", world / "prompts_safety.jsonl",
                     "--output-dir", st)
    assert code == 2 and "finished `safealign safety-test`" in err and "choose a new" in err and "--resume" not in err
    data_dir = tmp_path / "some_data"
    data_dir.mkdir()
    (data_dir / "x.jsonl").write_text("{}\n")
    code, err = call(cli, capfd, "eval", "--policy", data_dir, "--prompts", world / "prompts_eval.jsonl", "--output-dir", tmp_path / "eval")
    assert code == 2 and "has no config.json" in err
