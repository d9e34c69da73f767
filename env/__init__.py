from env.darkroom import (
    N_ACTIONS,
    Darkroom,
    DarkroomVecEnv,
    goal_to_pos,
    optimal_return,
    split_goals,
    start_pos,
    step_positions,
)

__all__ = [
    "N_ACTIONS",
    "Darkroom",
    "DarkroomVecEnv",
    "goal_to_pos",
    "optimal_return",
    "split_goals",
    "start_pos",
    "step_positions",
]
