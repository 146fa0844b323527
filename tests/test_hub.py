"""Hub names: the environment decides offline/online (the CLI never sets HF_HUB_OFFLINE), an
unreachable hub is bad input at once, and --data-config / --data-revision / --revision reach the
loaders. No network here: "unreachable" is the probe's answer, monkeypatched."""

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO


@pytest.fixture
def probe_calls(monkeypatch):
    from safealign.runtime import hub

    calls = []

    def unreachable(url, timeout=hub.PROBE_TIMEOUT_S):
        calls.append(url)
        return "gaierror: [Errno -2] Name or service not known"

    monkeypatch.setattr(hub, "probe", unreachable)
    monkeypatch.setattr(hub, "_probed", {})
    return calls


def _set_offline(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)


@pytest.mark.parametrize("value", [None, "0"])
def test_online_hub_name_with_unreachable_hub_is_bad_input_at_once(cli, tmp_path, capsys, probe_calls, monkeypatch, value):
    _set_offline(monkeypatch, value)
    out = tmp_path / "rm"
    t0 = time.perf_counter()
    assert cli("train-rm", "--data", "PKU-Alignment/PKU-SafeRLHF", "--output-dir", out) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert "unreachable" in err and "PKU-Alignment/PKU-SafeRLHF" in err and "HF_HUB_OFFLINE=1" in err
    assert probe_calls == ["https://huggingface.co"]
    assert not out.exists()
    assert os.environ.get("HF_HUB_OFFLINE") == value, "the CLI must not change the environment"


@pytest.mark.parametrize("value", [None, "0"])
def test_online_hub_model_with_unreachable_hub_is_bad_input(cli, world, tmp_path, capsys, probe_calls, monkeypatch, value):
    _set_offline(monkeypatch, value)
    assert cli("train-rm", "--model", "meta-llama/Llama-3.2-1B", "--data", world / "preferences.jsonl", "--output-dir", tmp_path / "rm") == 2
    err = capsys.readouterr().err
    assert "meta-llama/Llama-3.2-1B" in err and "unreachable" in err
    assert probe_calls


def test_offline_hub_model_not_in_cache_is_refused_without_a_network_call(cli, world, tmp_path, capsys, probe_calls, monkeypatch):
    _set_offline(monkeypatch, "1")
    assert cli("sft", "--model", "nobody-here/not-cached-model", "--data", world / "sft.jsonl", "--output-dir", tmp_path / "sft") == 2
    err = capsys.readouterr().err
    assert "not in the local HF cache" in err and "HF_HUB_OFFLINE=1" in err and "unset HF_HUB_OFFLINE" in err
    assert probe_calls == []


def test_offline_hub_dataset_reports_offline_mode(cli, tmp_path, capsys, probe_calls, monkeypatch):
    _set_offline(monkeypatch, "1")
    assert cli("data", "split", "--data", "nobody-here/not-cached-data", "--output-dir", tmp_path / "split") == 2
    err = capsys.readouterr().err
    assert "nobody-here/not-cached-data" in err and "HF_HUB_OFFLINE" in err
    assert probe_calls == []


def test_data_config_and_revisions_reach_the_loaders(cli, tmp_path, monkeypatch):
    """With a reachable hub, the dataset config and revision go to datasets.load_dataset and the model
    revision to from_pretrained (both stand-ins here)."""
    import datasets
    import transformers

    from safealign.runtime import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "probe", lambda url, timeout=0: None)
    monkeypatch.setattr(hub, "_probed", {})
    seen = {}

    def fake_load_dataset(name, config=None, split=None, revision=None):
        seen["dataset"] = (name, config, split, revision)
        return datasets.Dataset.from_list([{"prompt": f"question {i}?", "response": "answer."} for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert cli("data", "split", "--data", "org/prompts", "--data-config", "cfg-a", "--data-split", "test",
               "--data-revision", "v1.0", "--output-dir", tmp_path / "split") == 0
    assert seen["dataset"] == ("org/prompts", "cfg-a", "test", "v1.0")

    def fake_tokenizer(name, **kw):
        seen["model"] = (name, kw.get("revision"))
        raise OSError("stand-in: no such repository")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    assert cli("sft", "--model", "org/policy", "--revision", "abc123", "--data", tmp_path / "split" / "candidate.jsonl",
               "--output-dir", tmp_path / "sft") == 2
    assert seen["model"] == ("org/policy", "abc123")


def test_the_cli_leaves_hf_hub_offline_unset():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["PYTHONPATH"] = str(REPO)
    code = "import os, safealign.cli; print(os.environ.get('HF_HUB_OFFLINE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None"
