"""One progress convention: plain lines with an ETA on a pipe (never a carriage return), a tqdm bar
on a terminal, silence with SAFEALIGN_NO_PROGRESS=1, and the demo's stage counter."""

import io

import pytest

from safealign.runtime import progress as P


@pytest.fixture(autouse=True)
def _progress_on(monkeypatch):
    monkeypatch.delenv("SAFEALIGN_NO_PROGRESS", raising=False)


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(P.time, "perf_counter", c)
    return c


def test_pipe_gets_plain_lines_every_interval_with_eta(clock):
    out = io.StringIO()
    bar = P.Progress(10, "sft", initial=0, every_s=5, stream=out)
    for i in range(10):
        clock.t += 1.0
        bar.set_postfix(loss=0.5)
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # the first update, then every 5 s, then the end
    assert lines[0] == "sft: 1/10 steps (10%), 1 s elapsed, ETA 9 s, loss=0.5"
    assert lines[1].startswith("sft: 6/10 steps (60%), 6 s elapsed, ETA 4 s")
    assert lines[-1] == "sft: 10/10 steps (100%), 10 s elapsed, loss=0.5"
    assert len(lines) == 3


def test_eta_of_a_resumed_run_counts_only_this_runs_steps(clock):
    out = io.StringIO()
    bar = P.Progress(100, "ppo", initial=90, every_s=0, stream=out)
    clock.t += 2.0
    bar.update()
    assert out.getvalue().strip() == "ppo: 91/100 steps (91%), 2 s elapsed, ETA 18 s"


def test_terminal_gets_a_tqdm_bar(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = P.Progress(3, "rm", stream=out)
    assert bar._bar is not None
    for _ in range(3):
        bar.update()
    bar.close()
    assert "3/3" in out.getvalue()


def test_silenced_by_the_environment(monkeypatch):
    monkeypatch.setenv("SAFEALIGN_NO_PROGRESS", "1")
    out = io.StringIO()
    bar = P.Progress(3, "x", every_s=0, stream=out)
    bar.update(3)
    counter = P.StageCounter({"a": 1.0}, "demo", stream=out)
    counter.start("a")
    assert out.getvalue() == ""


def test_stage_counter_eta_from_the_stages_that_ran(clock):
    out = io.StringIO()
    c = P.StageCounter({"synth": 1.0, "sft": 3.0, "rm": 2.0, "cm": 2.0}, "demo", stream=out)
    c.skip("synth")
    c.start("sft")
    clock.t += 30.0
    c.start("rm")       # sft (weight 3) took 30 s: 10 s per unit, rm + cm left = 4 units
    clock.t += 20.0
    c.start("cm")
    c.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "demo: stage 1/4 synth (done earlier, skipped), 0 s elapsed"
    assert lines[1] == "demo: stage 2/4 sft, 0 s elapsed"
    assert lines[2] == "demo: stage 3/4 rm, 30 s elapsed, ETA 40 s"
    assert lines[3] == "demo: stage 4/4 cm, 50 s elapsed, ETA 20 s"


def test_fmt_seconds():
    assert (P.fmt_seconds(None), P.fmt_seconds(42), P.fmt_seconds(150), P.fmt_seconds(7200)) == ("?", "42 s", "2.5 min", "2.0 h")
