"""Two trainings at once end together: when one ends, the other is told (SIGUSR1) to take the freed core."""

import os
import signal
import time

import pytest
import torch

import jobs
from train import take_free_core


class FakeProc:
    def __init__(self, script: str, alive: bool = True):
        self.args = ["python", f"/repo/{script}", "num_threads=1"]
        self.alive, self.signals = alive, []

    def poll(self):
        return None if self.alive else 0

    def send_signal(self, sig):
        self.signals.append(sig)


def test_hand_over_core_signals_only_running_trainings_past_start_up():
    now = time.perf_counter()
    old, young, evaluation = FakeProc("train.py"), FakeProc("train.py"), FakeProc("evaluate.py")
    ended = FakeProc("train.py", alive=False)
    running = {"a": (old, None, now - 60), "b": (young, None, now - 1), "c": (evaluation, None, now - 60),
               "d": (ended, None, now - 60)}
    owed = {"a": 1, "b": 1, "c": 1, "d": 1}
    jobs.hand_over_core(running, owed)
    assert old.signals == [signal.SIGUSR1]
    assert young.signals == evaluation.signals == ended.signals == []  # too young for its handler, not a training, gone
    assert owed == {"a": 0, "b": 1}  # the young training keeps its core until it can take it
    jobs.hand_over_core(running, owed)
    assert old.signals == [signal.SIGUSR1] and young.signals == []  # nothing is sent twice
    running["b"] = (young, None, now - jobs.MIN_RUNNING_S - 1)  # a later poll, once it is old enough
    jobs.hand_over_core(running, owed)
    assert young.signals == [signal.SIGUSR1] and owed == {"a": 0, "b": 0}


def test_run_concurrently_hands_a_freed_core_to_a_training_that_started_just_before(tmp_path, monkeypatch):
    """The study's last seed starts when one of two trainings ends and the other ends seconds later, before the new
    one can take a signal: it must still get the freed core once it has run MIN_RUNNING_S."""
    clock = {"t": 0.0}
    monkeypatch.setattr(jobs.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(jobs.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + 5))
    monkeypatch.setattr(jobs.os, "cpu_count", lambda: 2)
    ends = {"seed0": 10, "seed1": 20, "seed2": 200}  # seed2 starts at ~10 s, seed1 ends at 20 s
    procs = {}

    class Proc(FakeProc):
        def __init__(self, cmd, env, stdout, stderr):
            super().__init__("train.py")
            self.args, self.name = cmd, cmd[cmd.index("--run-dir") + 1]
            procs[self.name] = self

        def poll(self):
            return 0 if clock["t"] >= ends[self.name] else None

    monkeypatch.setattr(jobs.subprocess, "Popen", Proc)
    jobs.run_concurrently({n: ("train.py", ["--run-dir", n], tmp_path / f"{n}.log") for n in ends})
    assert procs["seed2"].args[-1] == "num_threads=1"  # seed1 still ran when it started
    assert procs["seed2"].signals == [signal.SIGUSR1]  # seed1's core, handed over once seed2 was past start-up
    assert procs["seed0"].signals == procs["seed1"].signals == []  # nothing was freed while they ran with a queue


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to take a second one")
def test_take_free_core_adds_one_thread_up_to_the_cores():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        take_free_core()
        assert torch.get_num_threads() == 2
        torch.set_num_threads(os.cpu_count())
        take_free_core()
        assert torch.get_num_threads() == os.cpu_count()
    finally:
        torch.set_num_threads(before)


def test_log_text_keeps_the_last_state_of_redrawn_lines(tmp_path):
    log = tmp_path / "eval.log"
    log.write_text("start\nbar  10%\rbar  50%\rbar 100%\nmean return 15.2\n")
    assert jobs.log_text(log) == "start\nbar 100%\nmean return 15.2\n"


def test_run_concurrently_gives_num_threads_only_to_trainings(tmp_path, monkeypatch):
    started = []

    class Done:
        def __init__(self, cmd, env, stdout, stderr):
            started.append((cmd, env["OMP_NUM_THREADS"]))
            self.args = cmd

        def poll(self):
            return 0

    monkeypatch.setattr(jobs.subprocess, "Popen", Done)
    monkeypatch.setattr(jobs.os, "cpu_count", lambda: 2)
    jobs.run_concurrently({"train": ("train.py", ["--run-dir", "r"], tmp_path / "t.log"),
                           "evaluate": ("evaluate.py", ["--run-dir", "r"], tmp_path / "e.log")})
    (train_cmd, t_env), (eval_cmd, e_env) = started
    assert train_cmd[-1] == "num_threads=1" and not any("num_threads" in a for a in eval_cmd)  # evaluate.py: no such key
    assert t_env == e_env == "1"
    started.clear()
    jobs.run_concurrently({"train": ("train.py", ["--run-dir", "r"], tmp_path / "t.log")})  # alone: both cores
    assert started[0][0][-1] == "num_threads=2"


def test_train_threads_gives_a_training_the_cores_no_other_job_will_take():
    assert jobs.train_threads(n_jobs_left=5, max_jobs=2, cores=2) == 1  # two at once on 2 cores: one each
    assert jobs.train_threads(n_jobs_left=1, max_jobs=2, cores=2) == 2  # the last one alone
    assert jobs.train_threads(n_jobs_left=3, max_jobs=2, cores=8) == 4
    assert jobs.train_threads(n_jobs_left=1, max_jobs=1, cores=1) == 1
    assert jobs.train_threads(n_jobs_left=3, max_jobs=4, cores=2) == 1  # more jobs than cores: never 0
