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
from env.registry import SPLITS, BatchEnv, selected_tasks, task_family, task_split

__all__ = [
    "MOVES",
    "N_ACTIONS",
    "SPLITS",
    "BatchEnv",
    "Darkroom",
    "DarkroomVecEnv",
    "goal_to_pos",
    "optimal_return",
    "selected_tasks",
    "split_goals",
    "start_pos",
    "step_positions",
    "task_family",
    "task_split",
]
