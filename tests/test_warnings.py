"""Library deprecation warnings do not leak into runs (transformers' is_gradient_checkpointing, read
by peft; gradient_checkpointing_enable; torch_dtype), with transformers' logger at warning level and every Python warning shown."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_lora_runs_print_no_deprecation_warnings(world, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "always", "TRANSFORMERS_VERBOSITY": "warning",
           "HF_HUB_OFFLINE": "1", "SAFEALIGN_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "safealign", "sft", "--model", "tiny", "--data", str(world / "sft.jsonl"), "--output-dir",
           str(tmp_path / "sft"), "--max-steps", "2", "--check-prompts", "2", "--lora-r", "2", "--batch-size", "4", "--gradient-checkpointing"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for text in ("is_gradient_checkpointing", "torch_dtype", "FutureWarning", "DeprecationWarning"):
        assert text not in res.stderr, res.stderr[-2000:]
