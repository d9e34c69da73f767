"""The command-line scripts: the bugs a reading found (each with its test) and the one CLI convention."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, TINY_COLLECT, TINY_COMPRESSED, run_script

import evaluate
from common import load_config
from model import AD, ADConfig
from model.ad import COMPRESS_END

COMPRESSED_CONFIG = str(ROOT / "config" / "model" / "ad_dr_compressed.yaml")


def never_closing_run(run_dir, overrides: list[str]):
    """A checkpoint of a fresh compressed model whose head never says </compress> and whose longest region outlasts a
    2-episode evaluation (40 steps): a young run that closes no region while evaluated."""
    cfg = load_config(COMPRESSED_CONFIG, overrides)
    torch.manual_seed(0)
    model = AD(ADConfig.from_dict(cfg))
    with torch.no_grad():
        model.head_token_type.bias[COMPRESS_END] = -10.0
    run_dir.mkdir(parents=True)
    torch.save({"config": cfg, "model": model.state_dict(), "step": 0}, run_dir / "ckpt.pt")
    return run_dir


# ---- bug 1: a stream that closes no region ----------------------------------------------------------------------------


def test_region_stats_of_streams_that_close_nothing():
    s = evaluate.region_stats([[], [4, 9]], [[], []], [[], []])
    assert s["region_lengths"] == [[], [5, 5]] and s["first_region_lengths"] == [None, 5]
    assert s["consistency"] == 1.0 and s["n_region_pairs"] == 1
    none = evaluate.region_stats([[]], [[]])
    assert none["region_lengths"] == [[]] and none["consistency"] is None and none["n_region_pairs"] == 0
    assert evaluate.region_stats([[]], [[]], [[]])["first_region_lengths"] == [None]


def test_evaluate_a_run_that_closes_no_region(tmp_path):
    run_dir = never_closing_run(tmp_path / "young", ["d_model=16", "n_layer=1", "n_head=2"])
    proc = run_script("evaluate.py", "--run-dir", str(run_dir), "eval_episodes=2", "eval_streams=1")
    c = json.loads((run_dir / "eval_summary.json").read_text())["compression"]
    assert c["n_closes"] == c["n_forced_closes"] == 0 and c["consistency"] is None
    assert "</compress>: 0 closes" in proc.stdout and "previous one n/a" in proc.stdout


def test_probe_prints_na_for_undefined_precision():
    from probe import rollout_compression_line

    line = rollout_compression_line({"precision_compress_end": None, "recall_compress_end": None, "n_forced_closes": 3})
    assert line == "</compress> precision n/a recall n/a, forced closes 3"
    assert "precision 0.500" in rollout_compression_line({"precision_compress_end": 0.5, "recall_compress_end": 0.25,
                                                          "n_forced_closes": 0})


def test_probe_rollout_of_a_run_that_closes_no_region(tiny_history, tmp_path):
    over = [*TINY_COMPRESSED, "d_model=16", "n_transit=88", f"traj_dir={tiny_history['traj_dir']}"]
    run_dir = never_closing_run(tmp_path / "young", over)
    out = run_script("probe.py", "--run-dir", str(run_dir), "--split", "test", "--episodes", "2",
                     "eval_streams=1").stdout
    assert "in-context, 2 episodes" in out and "</compress> precision 0.000" in out


# ---- bug 2: probe.py's rollout length is eval_episodes= -------------------------------------------------------------


@pytest.fixture(scope="module")
def young_probe_run(tiny_history, tmp_path_factory):
    over = [*TINY_COMPRESSED, "d_model=16", "n_transit=88", f"traj_dir={tiny_history['traj_dir']}"]
    return never_closing_run(tmp_path_factory.mktemp("young") / "run", over)


def test_probe_rolls_out_eval_episodes(young_probe_run):
    out = run_script("probe.py", "--run-dir", str(young_probe_run), "--split", "test", "eval_episodes=2",
                     "eval_streams=1").stdout
    assert "in-context, 2 episodes" in out
    # the old flag is the same setting; the two at once must agree
    same = run_script("probe.py", "--run-dir", str(young_probe_run), "--split", "test", "--episodes", "2", "eval_episodes=2",
                      "eval_streams=1").stdout
    assert "in-context, 2 episodes" in same
    clash = run_script("probe.py", "--run-dir", str(young_probe_run), "--episodes", "3", "eval_episodes=2", check=False)
    assert clash.returncode == 2 and clash.stderr.strip().splitlines() == [
        "error: --episodes 3 and eval_episodes=2 disagree: --episodes is eval_episodes=N; pass one of them"]
    teacher_forced_only = run_script("probe.py", "--run-dir", str(young_probe_run), "--split", "test").stdout
    assert "in-context" not in teacher_forced_only


# ---- bug 4: a key the script does not read is refused ---------------------------------------------------------------


def assert_one_line_error(proc, phrase: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], proc.stderr
    return lines[0]


def test_collect_refuses_a_training_key(tmp_path):
    proc = run_script("collect.py", "--goals", "0", *TINY_COLLECT, f"traj_dir={tmp_path}", "train_timesteps=100",
                      check=False)
    assert_one_line_error(proc, "collect.py does not read 'train_timesteps' (train.py does)")
    assert not list(tmp_path.iterdir())  # nothing collected


def test_visualize_refuses_keys_it_does_not_read(tiny_history, tmp_path):
    for key, reader in (("train_timesteps=5", "train.py"), ("eval_episodes=3", "evaluate.py")):
        proc = run_script("visualize_compression.py", "--analyze", f"traj_dir={tiny_history['traj_dir']}", key,
                          cwd=tmp_path, check=False)
        assert_one_line_error(proc, f"visualize_compression.py does not read '{key.split('=')[0]}' ({reader} does)")
    assert not list(tmp_path.iterdir())  # no plot written


# ---- bug 5: key=value anywhere among the options ----------------------------------------------------------------------


def test_overrides_after_the_options(tmp_path):
    first, rest = TINY_COLLECT[0], TINY_COLLECT[1:]
    out = run_script("collect.py", f"traj_dir={tmp_path}", "--goals", "0", *rest, "--force", first).stdout
    assert "1 goals x 4 streams x 80 steps" in out  # n_stream=4, given after the options, was applied


def test_parse_cli_collects_overrides_anywhere_and_refuses_other_unknowns():
    import argparse

    from common import parse_cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--goals")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parse_cli(parser, ["a=1", "--goals", "0", "b=2", "--force", "a=3"])
    assert args.goals == "0" and args.force and args.overrides == ["a=1", "b=2", "a=3"]  # in order: the last a= wins
    assert parse_cli(parser, ["--goals", "0", "a=1"]).overrides == ["a=1"]
    for bad in (["--goals", "0", "stray"], ["--gaols", "0"], ["--goals", "0", "--what=1"]):
        with pytest.raises(SystemExit):
            parse_cli(parser, bad)


# ---- bug 6: evaluate.py --config applies the config's evaluation keys -------------------------------------------------


def test_evaluate_applies_the_eval_keys_of_its_config(tmp_path):
    run_dir = never_closing_run(tmp_path / "run", ["d_model=16", "n_layer=1", "n_head=2", "eval_episodes=3", "eval_streams=1"])
    config = tmp_path / "eval.yaml"
    config.write_text(f"include: {COMPRESSED_CONFIG}\neval_episodes: 2\neval_seed: 7\n")

    def summary(*args: str) -> dict:
        run_script("evaluate.py", "--run-dir", str(run_dir), "--config", str(config), "--force", *args)
        return json.loads((run_dir / "eval_summary.json").read_text())

    s = summary()
    assert s["n_episodes"] == 2 and s["eval_config"]["eval_seed"] == 7
    assert s["n_streams"] == 4  # every eval key of the config applies, included ones too (ad_dr.yaml: 4), not the run's 1
    assert summary("eval_episodes=1")["n_episodes"] == 1  # the command line wins


# ---- the one convention -------------------------------------------------------------------------------------------------

SCRIPTS = ("collect.py", "evaluate.py", "probe.py", "visualize_compression.py", "compare.py", "merge_histories.py",
           "example_compressed_training.py")
REQUIRED = {"--run-dir": "probe.py", "--standard": "compare.py", "--compressed": "compare.py"}


def help_entries(text: str) -> dict[str, str]:
    """--help's options section: the option strings of each entry -> its whole text."""
    entries, key = {}, None
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            key = line.split()[0].rstrip(",")
            entries[key] = line
        elif key and line.startswith("    "):
            entries[key] += " " + line.strip()
    return entries


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default_and_hyphenated_flags(script):
    entries = help_entries(run_script(script, "--help").stdout)
    assert entries and all("_" not in flag for flag in entries), list(entries)
    for flag, text in entries.items():
        if flag != "-h" and REQUIRED.get(flag) != script:
            assert "default" in text, f"{script} {flag}: no default in its help: {text}"


@pytest.mark.parametrize("script,args,new", [
    ("visualize_compression.py", ["--env_idx", "3"], "--goal"),
    ("visualize_compression.py", ["--max_steps", "5"], "--max-steps"),
    ("visualize_compression.py", ["--out", "x"], "--out-dir"),
    ("compare.py", ["--out", "x"], "--out-dir"),
    ("collect.py", ["--tasks", "0:3"], "--goals"),
])  # fmt: skip
def test_old_flag_names_are_one_line_naming_the_new(script, args, new, tmp_path):
    proc = run_script(script, *args, cwd=tmp_path, check=False)
    assert_one_line_error(proc, f"{args[0]} is now {new}")
    assert not list(tmp_path.iterdir())


def test_old_config_keys_name_the_new():
    from common import UserError, config_diff

    for old, new in (("test_interval", "val_interval"), ("test_batches", "val_batches")):
        with pytest.raises(UserError, match=f"config key '{old}' is now '{new}'"):
            load_config(COMPRESSED_CONFIG, [f"{old}=3"])
    cfg = load_config(COMPRESSED_CONFIG)
    assert cfg["val_interval"] == 500 and cfg["val_batches"] == 8
    old_run = {k: v for k, v in cfg.items() if k not in ("val_interval", "val_batches")} | {"test_interval": 500}
    assert config_diff(old_run, cfg) is None  # a run trained before the rename still resumes


def printed_config(*args: str, cwd=None) -> dict:
    import yaml

    proc = run_script(*args, "--print-config", cwd=cwd)
    return yaml.safe_load(proc.stdout)


def test_print_config_of_collection_scripts(tmp_path):
    for script in ("collect.py", "visualize_compression.py"):
        cfg = printed_config(script, "n_stream=3", "--goals" if script == "collect.py" else "--goal", "0", cwd=tmp_path)
        assert cfg["n_stream"] == 3 and cfg["grid_size"] == 9 and cfg["ppo_lr"] == 0.003  # the env include merged
    assert not list(tmp_path.iterdir())
    both = printed_config("example_compressed_training.py", "compressed.lr=0.0003", "--mode", "all", "n_stream=3")
    assert both["compressed"]["lr"] == 0.0003 and both["standard"]["lr"] == 0.001
    assert both["collect"]["n_stream"] == both["standard"]["n_stream"] == 3


def test_print_config_of_a_run(tmp_path):
    run_dir = never_closing_run(tmp_path / "run", ["d_model=16", "n_layer=1", "n_head=2"])
    for script in ("evaluate.py", "probe.py"):
        cfg = printed_config(script, "--run-dir", str(run_dir), "eval_episodes=2")
        assert cfg["eval_episodes"] == 2 and cfg["d_model"] == 16 and cfg["use_compressed_context"] is True
    assert sorted(p.name for p in run_dir.iterdir()) == ["ckpt.pt"]  # nothing evaluated
