"""The process group of `torchrun -m feedtune tune`: two real gloo processes agreeing (or not)
on their configuration, rank 0's orders reaching the other, and a lost trial queued again."""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
from typing import Any

import optuna
import pytest

from feedtune.config import load_config
from feedtune.training.distributed import Dist
from feedtune.tuning.optuna_storage import MAX_RETRIES, queue_again
from feedtune.tuning.trial_group import Order, TrialGroup, follow, record


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, out: Any) -> None:
    """One process of two: agree on the same config, disagree on another, then rank 0 says
    ``done`` and the other stops following."""
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    group = TrialGroup(Dist(rank, 2, 0, "gloo"), order_wait_s=30)
    cfg = load_config(None, [])
    said = []
    try:
        group.agree(cfg, "digest")
        try:
            group.agree(load_config(None, [f"train.lr={0.001 * (rank + 1)}"]), "digest")
        except ValueError as exc:
            said.append(str(exc))
        if rank == 0:
            group.send(Order("done"), cfg)
            said.append("sent")
        else:
            said.append(f"followed {follow(cfg, None, group, None)}")  # type: ignore[arg-type]
    finally:
        out.put((rank, said))
        tdist.destroy_process_group()


def test_processes_follow_rank_0_only_with_the_same_config():
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(rank, port, out)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    try:
        said = dict(out.get(timeout=120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    (refused0, sent), (refused1, followed) = said[0], said[1]
    assert (sent, followed) == ("sent", "followed 0")  # "done" at once: no order ran
    for text in (refused0, refused1):
        assert "differ in train.lr" in text and "same --config" in text


def test_one_process_sends_nothing(caplog):
    group = TrialGroup()
    cfg = load_config(None, [])
    with caplog.at_level(logging.INFO, logger="feedtune.tuning.trial_group"):
        group.send(Order("train", {"train.lr": 0.1}, "s", "quality", 0), cfg)
        group.agree(cfg, "digest")
    assert not caplog.records  # a single process keeps no record of its own


def test_a_record_holds_the_values_this_process_trained_with(caplog):
    cfg = load_config(None, ["train.lr=0.004", "augment.policy=basic"])
    params = {"train.lr": 0.004, "augment.policy": "basic"}
    order = Order("train", params, "s-quality", "quality", 3)
    with caplog.at_level(logging.INFO, logger="feedtune.tuning.trial_group"):
        record(order, cfg, Dist(1, 2, 0, "gloo"))
    (line,) = caplog.messages
    assert line == (
        'trains {"params": {"augment.policy": "basic", "train.lr": 0.004}, "rank": 1, '
        '"stage": "quality", "study": "s-quality", "trial": 3, "world_size": 2}'
    )


def test_a_lost_trial_is_queued_again_at_most_max_retries_times(tmp_path):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.journal"))
    )
    study = optuna.create_study(study_name="q", storage=storage, direction="maximize")
    queued = []
    for attempt in range(MAX_RETRIES + 1):
        trial = study.ask()  # a retry gets the same parameters and the run to resume from
        trial.suggest_float("train.lr", 1e-4, 1e-1, log=True)
        if attempt == 0:
            trial.set_user_attr("mlflow_run_id", "run-a")
        queued.append(queue_again(study, trial, why="its process group was lost", reason="lost"))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert queued == [True] * MAX_RETRIES + [False]
    trials = study.trials
    assert len(trials) == MAX_RETRIES + 1  # the last one was not queued again
    assert len({t.params["train.lr"] for t in trials}) == 1
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {"run-a"}
    assert [t.user_attrs.get("retries") for t in trials] == [None, *range(1, MAX_RETRIES + 1)]
    assert trials[1].user_attrs["retry_reason"] == "lost"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield
