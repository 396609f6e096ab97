import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from feedtune.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_round_trip_with_weights_only(tmp_path):
    payload = {
        "model_state": {"w": torch.ones(3)},
        "classes": ["a", "b"],
        "config": {"seed": 1, "x": None},
        "epoch": 2,
        "metrics": {"val_f1_macro": 0.5},
        "rng": rng_state(),
    }
    path = save_checkpoint(payload, tmp_path / "best.pt")
    loaded = torch.load(path, weights_only=True)
    assert loaded["classes"] == ["a", "b"] and loaded["epoch"] == 2
    assert load_checkpoint(path)["model_state"]["w"].sum() == 3


def test_rng_state_restores_all_generators():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model_state": evil}, f)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(path)
    assert not marker.exists()


def test_killed_writer_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model_state": {"w": torch.zeros(2)}, "epoch": 1}, path)
    # A child process starts writing a large checkpoint and is killed mid-write.
    code = (
        "import os, signal, torch, sys\n"
        "sys.path.insert(0, 'src')\n"
        "from feedtune.training import checkpoint\n"
        "orig = torch.save\n"
        "def slow(obj, f):\n"
        "    f.write(b'x' * 1000)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint.torch.save = slow\n"
        "payload = {'model_state': {'w': torch.ones(10)}, 'epoch': 2}\n"
        f"checkpoint.save_checkpoint(payload, {str(path)!r})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert proc.returncode != 0
    assert load_checkpoint(path)["epoch"] == 1
