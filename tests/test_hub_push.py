"""--push-to-hub against a local stand-in for the Hub API: HfApi's whoami/create_repo/upload_folder
are replaced by functions that record the calls and copy what upload_folder would upload (the same
ignore-pattern filter huggingface_hub applies) into a temporary "hub". No network is used.

What a user relies on: the push happens only after the run succeeded (safety-test: only on PASS,
only release/), settings that cannot work are refused before anything runs (exit 2), and a failed
push keeps the local result (exit 2 when the user can fix it, 1 otherwise)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

FAST = ["--batch-size", "8", "--log-steps", "1", "--lr", "2e-3", "--check-prompts", "0", "--max-samples", "64"]


def http_error(status: int):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl, constants
    from huggingface_hub.utils import filter_repo_objects

    root = tmp_path / "hub"
    stand_in = SimpleNamespace(root=root, calls=[], whoami_error=None, upload_error=None)
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))

    def whoami(self, token=None, **kw):
        stand_in.calls.append(("whoami",))
        if stand_in.whoami_error:
            raise stand_in.whoami_error
        return {"name": "alice"}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kw):
        full = repo_id if "/" in repo_id else f"alice/{repo_id}"
        stand_in.calls.append(("create_repo", full, private, exist_ok))
        (root / full).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{full}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, commit_message=None, **kw):
        stand_in.calls.append(("upload_folder", repo_id, str(folder_path)))
        if stand_in.upload_error:
            raise stand_in.upload_error
        src = Path(folder_path)
        files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        for rel in filter_repo_objects(files, ignore_patterns=ignore_patterns):
            (root / repo_id / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, root / repo_id / rel)
        return SimpleNamespace(oid="0123abcd", commit_url=f"https://huggingface.co/{repo_id}/commit/0123abcd")

    monkeypatch.setattr(HfApi, "whoami", whoami)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return stand_in


def test_sft_pushes_its_model_after_the_run(cli, world, tmp_path, hub, capsys):
    out = tmp_path / "sft"
    assert cli("sft", "--model", "tiny", "--data", world / "sft.jsonl", "--output-dir", out, "--max-steps", "2",
               "--push-to-hub", "--hub-model-id", "tiny-sft", "--hub-private", *FAST) == 0
    assert [c[0] for c in hub.calls] == ["whoami", "create_repo", "upload_folder"]
    assert hub.calls[1] == ("create_repo", "alice/tiny-sft", True, True)
    repo = hub.root / "alice" / "tiny-sft"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "safealign.json", "README.md", "report.json", "config.yaml"):
        assert (repo / f).is_file(), f
    assert (out / "checkpoints").is_dir() and not (repo / "checkpoints").exists()   # resumable state stays local
    assert 'path = "alice/tiny-sft"' in (repo / "README.md").read_text()          # the card's snippet loads from the hub
    assert json.loads((out / "report.json").read_text())["hub"]["repo_id"] == "alice/tiny-sft"
    assert "pushed" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no-token", "offline", "bad-repo-id", "token-refused"])
def test_settings_that_cannot_push_are_refused_before_the_run(cli, world, tmp_path, hub, monkeypatch, capsys, case):
    extra = ["--hub-model-id", "bad id!!"] if case == "bad-repo-id" else []
    if case == "no-token":
        monkeypatch.delenv("HF_TOKEN")
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case == "token-refused":
        hub.whoami_error = http_error(401)
    out = tmp_path / "sft"
    assert cli("sft", "--model", "tiny", "--data", world / "sft.jsonl", "--output-dir", out, "--max-steps", "2", "--push-to-hub", *extra, *FAST) == 2
    assert not out.exists()                                    # nothing ran, nothing was written
    assert not [c for c in hub.calls if c[0] != "whoami"]
    err = capsys.readouterr().err
    assert {"no-token": "HF_TOKEN", "offline": "HF_HUB_OFFLINE", "bad-repo-id": "not a valid repository id",
            "token-refused": "did not accept the token"}[case] in err


@pytest.mark.parametrize("status,code", [(403, 2), (503, 1)])
def test_a_failed_push_keeps_the_local_result(cli, world, tmp_path, hub, capsys, status, code):
    hub.upload_error = http_error(status)
    out = tmp_path / "sft"
    card_path = f'path = "{out.resolve()}"'
    assert cli("sft", "--model", "tiny", "--data", world / "sft.jsonl", "--output-dir", out, "--max-steps", "1", "--push-to-hub", *FAST) == code
    assert (out / "model.safetensors").is_file() and json.loads((out / "report.json").read_text())["reload_check"]["ok"]
    assert card_path in (out / "README.md").read_text()       # the card still points at the local copy
    err = capsys.readouterr().err
    assert f"hf upload alice/sft {out}" in err and str(status) in err


def test_safety_test_pushes_release_on_pass_and_nothing_on_nsf(cli, tiny_policy, tiny_cm, world, tmp_path, hub):
    common = ["--policy", tiny_policy, "--cost-model", tiny_cm, "--prompts", world / "prompts_safety.jsonl", "--max-prompts", 12,
              "--max-new-tokens", 4, "--registry", tmp_path / "registry.jsonl", "--push-to-hub", "--hub-model-id", "org/safe-policy"]
    assert cli("safety-test", *common, "--output-dir", tmp_path / "nsf", "--threshold", -100) == 3
    assert not [c for c in hub.calls if c[0] != "whoami"]    # No Solution Found: nothing is pushed
    assert cli("safety-test", *common, "--output-dir", tmp_path / "pass", "--threshold", 100, "--allow-retest") == 0
    assert hub.calls[-1] == ("upload_folder", "org/safe-policy", str(tmp_path / "pass" / "release"))
    repo = hub.root / "org" / "safe-policy"
    assert (repo / "model.safetensors").is_file() and (repo / "safety_test.json").is_file()
    assert "passed the safealign safety test" in (repo / "README.md").read_text()
    assert not (repo / "costs.jsonl").exists()                 # only the released model, not the test's workings
