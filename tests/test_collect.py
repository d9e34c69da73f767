import h5py
import numpy as np
import yaml

from env import Darkroom, goal_to_pos


def test_hdf5_layout(tiny_history):
    with h5py.File(tiny_history["path"], "r") as f:
        assert sorted(int(k) for k in f) == tiny_history["goals"]
        assert f.attrs["format_version"] == 1 and f.attrs["n_steps"] == 20 and f.attrs["grid_size"] == 9
        assert yaml.safe_load(f.attrs["config"])["n_stream"] == 4
        g = f["38"]
        assert tuple(g.attrs["goal"]) == goal_to_pos(38) and g.attrs["n_steps"] == 20
        T, S = 80, 4
        shapes = {"states": (T, S, 2), "actions": (T, S), "rewards": (T, S), "next_states": (T, S, 2), "dones": (T, S),
                  "compress_start": (T, S), "compress_end": (T, S)}
        for name, shape in shapes.items():
            assert g[name].shape == shape, name
            assert g[name].compression == "gzip" and g[name].chunks is not None
        assert g["states"].dtype == np.int8 and g["dones"].dtype == bool


def test_markers_at_rollout_boundaries(tiny_history):
    with h5py.File(tiny_history["path"], "r") as f:
        cs, ce = f["0"]["compress_start"][:], f["0"]["compress_end"][:]
    t = np.arange(80)
    assert (cs == (t % 20 == 0)[:, None]).all()  # <compress> before steps 0, 20, 40, 60
    assert (ce == (t % 20 == 19)[:, None]).all()  # </compress> after steps 19, 39, 59, 79


def test_every_transition_replays_through_the_env(tiny_history):
    with h5py.File(tiny_history["path"], "r") as f:
        for key in f:
            g = f[key]
            d = {k: g[k][:] for k in ("states", "actions", "rewards", "next_states", "dones")}
            for s in range(d["actions"].shape[1]):
                env = Darkroom(goal=int(key))
                obs, _ = env.reset()
                for t in range(d["actions"].shape[0]):
                    assert (d["states"][t, s] == obs).all()
                    obs, r, _, trunc, _ = env.step(int(d["actions"][t, s]))
                    assert (d["next_states"][t, s] == obs).all()  # the terminal observation at episode ends
                    assert d["rewards"][t, s] == r and d["dones"][t, s] == trunc
                    if trunc:
                        obs, _ = env.reset()
