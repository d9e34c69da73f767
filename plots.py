"""Plot helpers the scripts share (compare.py, probe.py, visualize_compression.py): matplotlib on a file-only backend."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: it costs a second)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def task_label(g: dict) -> str:
    """A per-goal entry's task description (summaries from before the env registry hold the Darkroom goal `pos`)."""
    return g["task"] if "task" in g else "goal ({},{})".format(*g["pos"])
