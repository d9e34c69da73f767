from env.darkroom import (
    MOVES,
    N_ACTIONS,
    Darkroom,
    DarkroomVecEnv,
    goal_to_pos,
    optimal_return,
    split_goals,
    start_pos,
    step_positions,
)

SPLITS = ("train", "val", "test")


def task_split(cfg: dict, split: str) -> list[int]:
    """The goals of one split ("train", "val" or "test") for a config (docs/design.md §1)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    parts = split_goals(cfg["grid_size"], cfg["env_split_seed"], cfg["train_env_ratio"], cfg.get("n_val_tasks", 8))
    return dict(zip(SPLITS, parts, strict=True))[split]


__all__ = [
    "MOVES",
    "N_ACTIONS",
    "SPLITS",
    "Darkroom",
    "DarkroomVecEnv",
    "goal_to_pos",
    "optimal_return",
    "split_goals",
    "start_pos",
    "step_positions",
    "task_split",
]
