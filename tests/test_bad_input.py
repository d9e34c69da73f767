"""Bad input: one clear line on stderr starting with "error:", a non-zero exit, and nothing on disk changed.

Every case runs its script in its own copy of a small workspace (good and damaged history files, a finished run,
damaged checkpoints), so the cases can run side by side; the whole workspace is hashed before and after.
"""

from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import pytest
import torch
from conftest import ROOT, TINY_COLLECT, TINY_COMPRESSED, TINY_STANDARD, run_script

HISTORY = "history_darkroom_PPO_alg-seed42.hdf5"
COMPRESSED = ["--config", str(ROOT / "config" / "model" / "ad_dr_compressed.yaml")]
STANDARD = [*TINY_STANDARD, "traj_dir=datasets", "train_timesteps=3"]  # paths are relative to the workspace
COMPRESSED_TINY = [*TINY_COMPRESSED, "traj_dir=datasets", "train_timesteps=3"]


def with_history(kind: str, args: list[str]) -> list[str]:
    return [*args, f"traj_dir={kind}"]  # the last traj_dir= wins


# (id, script, arguments, phrase the error line must contain)
CASES = [
    ("missing_history", "train.py", ["--run-dir", "new", *with_history("nowhere", STANDARD)], "history file not found"),
    ("garbage_history", "train.py", ["--run-dir", "new", *with_history("garbage", STANDARD)], "truncated or corrupt"),
    ("half_history", "train.py", ["--run-dir", "new", *with_history("half", STANDARD)], "truncated or corrupt"),
    ("history_without_markers", "train.py", [*COMPRESSED, "--run-dir", "new", *with_history("nomarkers", COMPRESSED_TINY)],
     "has no compression markers"),
    ("history_other_grid_size", "train.py", ["--run-dir", "new", *STANDARD, "grid_size=7"], "collected with grid_size=9"),
    ("history_other_n_steps", "train.py", ["--run-dir", "new", *STANDARD, "n_steps=40", "compress_interval=40"],
     "collected with n_steps=20"),
    ("compress_interval_not_n_steps", "train.py", [*COMPRESSED, "--run-dir", "new", *COMPRESSED_TINY, "compress_interval=40"],
     "compress_interval=40 must equal PPO n_steps=20"),
    ("n_transit_too_small", "train.py", [*COMPRESSED, "--run-dir", "new", *COMPRESSED_TINY, "n_transit=42"],
     "n_transit=42 is too small"),
    ("unknown_key", "train.py", ["--run-dir", "new", *STANDARD, "lerning_rate=0.1"], "unknown config key 'lerning_rate'"),
    ("unknown_key_in_file", "train.py", ["--config", "typo.yaml", "--run-dir", "new", *STANDARD],
     "unknown config key 'n_layers'"),
    ("bad_value_type", "train.py", ["--run-dir", "new", *STANDARD, "lr=fast"], "'lr' must be float"),
    ("bad_bool", "evaluate.py", ["--run-dir", "run", "eval_cache=maybe"], "'eval_cache' must be bool"),
    ("missing_config_file", "train.py", ["--config", "nope.yaml"], "config file not found"),
    ("missing_checkpoint", "evaluate.py", ["--run-dir", "empty_run"], "no checkpoint in empty_run"),
    ("run_dir_nowhere", "evaluate.py", ["--run-dir", "no/such/run"], "does not exist"),
    ("garbage_checkpoint_evaluate", "evaluate.py", ["--run-dir", "garbage_ckpt"], "is unreadable"),
    ("garbage_checkpoint_train", "train.py", ["--run-dir", "garbage_ckpt", *STANDARD], "is unreadable"),
    ("half_checkpoint_evaluate", "evaluate.py", ["--run-dir", "half_ckpt"], "is unreadable"),
    ("checkpoint_of_other_config", "train.py", ["--run-dir", "run", *STANDARD, "d_model=32", "train_timesteps=6"],
     "was trained with d_model=16, not 32"),
    ("checkpoint_weights_not_its_config_evaluate", "evaluate.py", ["--run-dir", "wrong_ckpt"], "does not match its model"),
    ("checkpoint_weights_not_its_config_train", "train.py",
     ["--run-dir", "wrong_ckpt", *STANDARD, "d_model=32", "train_timesteps=6"], "does not fit the model of its config"),
    ("eval_override_of_model_key", "evaluate.py", ["--run-dir", "run", "d_model=8"], "'d_model' is fixed by the checkpoint"),
    ("finished_run", "train.py", ["--run-dir", "run", *STANDARD], "already finished"),
    ("run_dir_of_something_else", "train.py", ["--run-dir", "foreign_run", *STANDARD], "holds no checkpoint of this config"),
    ("goal_outside_grid", "collect.py", ["--goals", "200", *TINY_COLLECT, "traj_dir=fresh"],
     "--goals 200 is outside the task range: use 0..80"),
    ("fp16_on_cpu", "train.py", ["--run-dir", "new", *STANDARD, "mixed_precision=fp16"], "mixed_precision=fp16 needs a GPU"),
    ("history_of_another_collection", "train.py", ["--run-dir", "new", *STANDARD, "n_stream=100"],
     "was collected with n_stream=4 (config: 100)"),
    ("bad_close_threshold", "evaluate.py", ["--run-dir", "run", "eval_close_threshold=1.5"],
     "eval_close_threshold must be in [0, 1)"),
    ("bad_eval_prune", "evaluate.py", ["--run-dir", "run", "eval_prune=sometimes"], "eval_prune must be one of model, fixed"),
    ("eval_overwrite_other_settings", "evaluate.py", ["--run-dir", "run", "eval_seed=1"],
     "holds an evaluation of these weights with eval_seed=0 (now 1); pass --force"),
    ("probe_model_key", "probe.py", ["--run-dir", "run", "d_model=8"], "'d_model' is fixed by the checkpoint"),
    ("probe_reach_of_no_summary_run", "probe.py", ["--run-dir", "run", "--summary-reach", "0,3"],
     "--summary-reach needs a summary run (use_summary=true)"),
    ("probe_reach_bad_number", "probe.py", ["--run-dir", "run", "--summary-reach", "1,-2"],
     "--summary-reach must be comma-separated numbers of pruned regions >= 0, got '1,-2'"),
    ("existing_history", "collect.py", ["--goals", "0", *TINY_COLLECT, "traj_dir=datasets"], "already exists: pass --force"),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tiny_history, tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("bad_input_base")
    good = tiny_history["path"]
    for kind in ("datasets", "garbage", "half", "nomarkers"):
        (w / kind).mkdir()
    shutil.copy(good, w / "datasets" / HISTORY)
    (w / "garbage" / HISTORY).write_bytes(bytes(range(256)) * 20)
    data = good.read_bytes()
    (w / "half" / HISTORY).write_bytes(data[: len(data) // 2])
    shutil.copy(good, w / "nomarkers" / HISTORY)
    with h5py.File(w / "nomarkers" / HISTORY, "a") as f:
        for g in f:
            f[g]["compress_start"][...] = False
            f[g]["compress_end"][...] = False
    (w / "typo.yaml").write_text(f"include: {ROOT / 'config' / 'model' / 'ad_dr.yaml'}\nn_layers: 2\n")

    run_script("train.py", "--run-dir", "run", *STANDARD, cwd=w)  # a finished run
    run_script("evaluate.py", "--run-dir", "run", cwd=w)  # ... and evaluated (eval_seed 0)
    ckpt_bytes = (w / "run" / "ckpt.pt").read_bytes()
    for name, content in (("garbage_ckpt", b"\x80\x02garbage" * 100), ("half_ckpt", ckpt_bytes[: len(ckpt_bytes) // 2])):
        (w / name).mkdir()
        (w / name / "ckpt.pt").write_bytes(content)
    (w / "wrong_ckpt").mkdir()
    ckpt = torch.load(w / "run" / "ckpt.pt", map_location="cpu", weights_only=False)
    ckpt["config"]["d_model"] = 32  # the weights are still those of d_model=16
    ckpt["step"] = 1
    torch.save(ckpt, w / "wrong_ckpt" / "ckpt.pt")
    (w / "empty_run").mkdir()
    (w / "foreign_run").mkdir()
    (w / "foreign_run" / "notes.txt").write_text("not a run\n")
    return w


@pytest.fixture(scope="module")
def outcomes(workspace, tmp_path_factory) -> dict:
    """Runs every case (4 at a time, each in its own copy of the workspace): id -> (process, before, after)."""
    dirs = {}
    for case_id, *_ in CASES:
        dirs[case_id] = tmp_path_factory.mktemp(case_id)
        shutil.copytree(workspace, dirs[case_id], dirs_exist_ok=True)

    def run(case):
        case_id, script, args, _ = case
        w = dirs[case_id]
        before = snapshot(w)
        proc = run_script(script, *args, cwd=w, check=False, timeout=120)
        return case_id, (proc, before, snapshot(w))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, CASES))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(case, outcomes):
    case_id, script, args, phrase = case
    proc, before, after = outcomes[case_id]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], proc.stderr
    assert after == before, "files changed on disk"


@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
])
def test_out_of_memory_is_one_line_naming_the_fix(exc, capsys):
    from common import run_main

    def main():
        raise exc

    with pytest.raises(SystemExit) as e:
        run_main(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 3 and len(err) == 1
    assert err[0].startswith("error: out of memory") and "lower train_batch_size" in err[0]


def test_other_runtime_errors_are_not_disguised():
    from common import run_main

    def main():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_main(main)
