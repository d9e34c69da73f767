"""Running repo scripts as subprocesses for the workflow (example_compressed_training.py) and the study (study.py):
one at a time with output on the terminal, or several at once with one thread each, each logging to its own file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, UserError

MIN_RUNNING_S = 30.0  # a job gets SIGUSR1 only once it has run this long (train.py installs its handler at start-up)


def say(stage: str, msg: str) -> None:
    print(f"[{stage}] {msg}", flush=True)


def run_stage(stage: str, script: str, args: list[str]) -> None:
    """Run one repo script with this interpreter; its output (progress bars included) goes straight to the terminal."""
    cmd = [sys.executable, str(ROOT / script), *args]
    say(stage, "run: python " + " ".join([script, *args]))
    start = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise UserError(
            f"stage '{stage}' failed: {script} exited with {rc} (its error is above); fix it and re-run "
            "this command, finished stages are skipped"
        )
    say(stage, f"done in {time.perf_counter() - start:.0f} s")


def log_text(log: Path) -> str:
    """A job's log as a terminal would have shown it: of each line redrawn with carriage returns (progress bars), its
    last state."""
    text = log.read_bytes().decode(errors="replace")  # read_text would turn every \r into a new line
    return "\n".join(line.split("\r")[-1] for line in text.split("\n"))


def hand_over_core(running: dict, owed: dict[str, int]) -> None:
    """Cores freed while no job was waiting: tell each running train.py job the cores it is `owed` (SIGUSR1, one per
    core), so it takes one more thread each (train.take_free_core) and the last training does not leave a core idle.
    Jobs younger than MIN_RUNNING_S keep what they are owed until they are old enough (called again on every poll):
    before train.py installs its handler, SIGUSR1 would end it. Jobs that are not trainings or have ended owe nothing."""
    now = time.perf_counter()
    for name, (proc, _, started) in running.items():
        if not owed.get(name):
            continue
        if not hasattr(signal, "SIGUSR1") or "train.py" not in " ".join(map(str, proc.args)) or proc.poll() is not None:
            owed.pop(name)
        elif now - started >= MIN_RUNNING_S:
            proc.send_signal(signal.SIGUSR1)
            owed[name] -= 1


def train_threads(n_jobs_left: int, max_jobs: int, cores: int | None = None) -> int:
    """Intra-op threads for a training started while `n_jobs_left` jobs (itself included) are running or queued: one
    where `max_jobs` will run at once, else its share of the cores no job will take (a lone training on 2 cores: 2).
    Later, when a job ends, `hand_over_core` gives its core to a running training."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, min(max_jobs, n_jobs_left)))


def run_concurrently(jobs: dict[str, tuple[str, list[str], Path]], max_jobs: int = 2) -> None:
    """Run repo scripts `max_jobs` at a time (the next starts when one ends), one thread each (`OMP_NUM_THREADS=1`, and
    `num_threads=1` for train.py), each logging to its own file: on a 2-core CPU two single-thread trainings finish
    sooner than the same two one after the other with 2 threads each (docs/experiments.md E7). A training that starts
    with cores no other job will take (fewer jobs left than `max_jobs`) gets them as threads: `train_threads`. A failure
    stops the others and shows the failed job's log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    queue, running, owed = list(jobs.items()), {}, {}
    start = time.perf_counter()
    try:
        while queue or running:
            while queue and len(running) < max_jobs:
                name, (script, args, log) = queue.pop(0)
                log.parent.mkdir(parents=True, exist_ok=True)
                n = train_threads(len(running) + 1 + len(queue), max_jobs)
                args = [*args, f"num_threads={n}"] if script == "train.py" else args  # others: OMP_NUM_THREADS=1
                say(name, f"run: python {script} {' '.join(args)}  (log: {log})")
                proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], env=env,
                                        stdout=log.open("w"), stderr=subprocess.STDOUT)
                running[name] = (proc, log, time.perf_counter())
            for name, (proc, log, _) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                if rc != 0:
                    print("\n".join(log_text(log).splitlines()[-15:]), file=sys.stderr)
                    raise UserError(f"stage '{name}' failed: exited with {rc} (its log {log} ends as above); fix it and "
                                    "re-run this command, finished stages are skipped")
                say(name, f"done ({time.perf_counter() - start:.0f} s since the first started)")
                owed.pop(name, None)
                if not queue:  # its core is free: the running trainings take it (one that just started, once it can)
                    for other in running:
                        owed[other] = owed.get(other, 0) + 1
            hand_over_core(running, owed)
            time.sleep(0.5)
    finally:
        for proc, *_ in running.values():
            proc.terminate()
            proc.wait()
