"""One run on several processes: the shares of the samplers, the gathered evaluation, and
`torchrun -m feedtune train` end to end (one MLflow run, metrics of the whole val set; a rank
killed mid-run ends the others within train.dist_timeout_s)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from feedtune.config import ConfigError, SamplerConfig, load_config
from feedtune.feed.feed import build_feed
from feedtune.feed.sampling import DistributedWeightedSampler, build_sampler, epoch_draw
from feedtune.sources.prepare import prepare_data
from feedtune.training.distributed import Dist, group_failure, init_from_env, unwrap
from feedtune.training.engine import EpochStats, combined_stats
from feedtune.training.evaluation import evaluate
from tests.conftest import REPO, env_with_src, reaped, write_image_folder


def _targets() -> np.ndarray:
    return np.array([0] * 60 + [1] * 25 + [2] * 16)  # 101 samples: shares need padding


def _shares(cfg: SamplerConfig, world: int, *, seed: int = 7, epoch: int = 0) -> list[list[int]]:
    """Every rank's indices for one epoch, each rank's generator seeded alike (as the trainer
    reseeds them) and told the epoch."""
    out = []
    for rank in range(world):
        sampler = build_sampler(
            cfg,
            targets=_targets(),
            generator=torch.Generator().manual_seed(seed),
            seed=seed,
            rank=rank,
            world_size=world,
        )
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("num_samples", [None, 64])
def test_weighted_shares_together_are_the_single_process_draw(world, num_samples):
    cfg = SamplerConfig(kind="weighted", weight_power=1.0, num_samples=num_samples)
    generator = torch.Generator().manual_seed(7)
    single = list(build_sampler(cfg, targets=_targets(), generator=generator))
    shares = _shares(cfg, world)
    assert all(isinstance(s, int) for s in shares[0])
    assert len({len(s) for s in shares}) == 1  # equal shares: equal steps on every rank
    interleaved = [i for row in zip(*shares, strict=True) for i in row]
    assert interleaved[: len(single)] == single
    assert interleaved[len(single) :] == single[: len(interleaved) - len(single)]  # the padding


def test_weighted_share_refuses_a_rank_outside_the_job():
    with pytest.raises(ValueError, match="rank 2"):
        DistributedWeightedSampler(
            torch.ones(4, dtype=torch.double),
            num_samples=4,
            replacement=True,
            generator=torch.Generator(),
            rank=2,
            world_size=2,
        )


@pytest.mark.parametrize("world", [2, 3])
def test_random_shares_cover_the_dataset_and_reshuffle_by_epoch(world):
    cfg = SamplerConfig(kind="random")
    shares = _shares(cfg, world)
    n = len(_targets())
    assert len({len(s) for s in shares}) == 1
    assert set().union(*shares) == set(range(n))
    assert sum(len(s) for s in shares) == -(-n // world) * world  # n, padded to equal shares
    assert _shares(cfg, world, epoch=1) != shares
    assert _shares(cfg, world) == shares  # the seed and the epoch decide


def test_sequential_shares_interleave_to_the_dataset_order():
    shares = _shares(SamplerConfig(kind="sequential"), 2)
    assert isinstance(
        build_sampler(
            SamplerConfig(kind="sequential"),
            targets=_targets(),
            generator=torch.Generator(),
            rank=1,
            world_size=2,
        ),
        DistributedSampler,
    )
    interleaved = [i for row in zip(*shares, strict=True) for i in row]
    assert interleaved[:101] == list(range(101))


@pytest.mark.parametrize("kind", ["random", "weighted", "sequential"])
def test_epoch_draw_of_a_share_is_the_draw_of_all_processes(kind):
    cfg = SamplerConfig(kind=kind)
    share = build_sampler(
        cfg, targets=_targets(), generator=torch.Generator().manual_seed(7), rank=1, world_size=3
    )
    draw = list(epoch_draw(share))
    assert len(draw) == len(_targets())
    if kind == "weighted":
        generator = torch.Generator().manual_seed(7)
        assert draw == list(build_sampler(cfg, targets=_targets(), generator=generator))
    else:
        assert sorted(draw) == list(range(len(_targets())))
        assert (draw == sorted(draw)) == (kind == "sequential")


def test_the_feed_gives_each_rank_its_val_images_once(tiny_folder):
    cfg = load_config(
        None, [f"data.path={tiny_folder}", "augment.image_size=32", "sampler.kind=weighted"]
    )
    data = prepare_data(cfg, progress=False)
    n_val = len(data.split.val)
    seen = []
    for rank in range(2):
        feed = build_feed(cfg, data, torch.device("cpu"), rank=rank, world_size=2)
        share = feed.val.loader.dataset
        assert isinstance(share, Subset) and list(share.indices) == list(range(rank, n_val, 2))
        assert len(feed.val_set) == n_val  # the whole set stays on the feed
        assert isinstance(feed.sampler, DistributedWeightedSampler)
        seen += list(share.indices)
    assert sorted(seen) == list(range(n_val))


class _Pair:
    """Rank 0 of two processes whose other rank's share is known in advance."""

    rank, world_size, enabled = 0, 2, True

    def __init__(self, peer: Any) -> None:
        self.peer = peer

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj, self.peer]


def test_gathered_evaluation_equals_one_process_on_the_whole_set():
    torch.manual_seed(0)
    x = torch.randn(21, 4)
    data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def run(dataset, dist=None):
        return evaluate(
            model,
            DataLoader(dataset, batch_size=4),
            nn.CrossEntropyLoss(),
            device=torch.device("cpu"),
            num_classes=3,
            progress=False,
            dist=dist,
        )

    whole = run(data)
    other = run(Subset(data, range(1, 21, 2)))
    peer = (other.loss * len(other.y_true), len(other.y_true), other.y_true, other.y_pred)
    gathered = run(Subset(data, range(0, 21, 2)), _Pair(peer))
    assert np.array_equal(gathered.y_true, whole.y_true)  # back in the val set's order
    assert np.array_equal(gathered.y_pred, whole.y_pred)
    assert gathered.acc == whole.acc and gathered.f1_macro == whole.f1_macro
    assert gathered.per_class_recall == whole.per_class_recall
    assert np.array_equal(gathered.confusion, whole.confusion)
    assert gathered.loss == pytest.approx(whole.loss, abs=1e-6)


def test_epoch_stats_count_every_process_over_the_slowest():
    mine = EpochStats(loss=1.0, samples=40, steps=5, seconds=2.0, data_wait_s=0.1)
    pair = _Pair((3.0, 40, 4.0, 0.5))
    both = combined_stats(mine, pair)  # type: ignore[arg-type]
    assert both.samples == 80 and both.loss == pytest.approx(2.0)
    assert both.seconds == 4.0 and both.data_wait_s == 0.5
    assert both.samples_per_s == pytest.approx(20.0)
    assert combined_stats(mine, Dist()) is mine


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = init_from_env(torch.device("cpu"))
    assert dist == Dist() and dist.is_main and not dist.enabled
    assert dist.all_reduce(3.5) == 3.5 and dist.all_gather("x") == ["x"]
    assert dist.broadcast({"a": 1}) == {"a": 1}
    model = nn.Linear(2, 2)
    assert dist.wrap(model, torch.device("cpu")) is model and unwrap(model) is model
    assert dist.device(torch.device("cuda")) == torch.device("cuda")
    dist.barrier()
    dist.destroy()


def test_commands_other_than_train_and_tune_refuse_torchrun(monkeypatch, capsys):
    from feedtune.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "torchrun" in err and "feedtune tune" in err and err.count("\n") == 1


def test_dist_timeout_is_a_positive_number_of_seconds():
    assert load_config(None, []).train.dist_timeout_s == 120
    assert load_config(None, ["train.dist_timeout_s=20"]).train.dist_timeout_s == 20
    with pytest.raises(ConfigError, match="train.dist_timeout_s"):
        load_config(None, ["train.dist_timeout_s=0"])


GLOO_RESET = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:405: "
    "Connection reset by peer. This is typically caused by a remote worker hanging."
)


def test_group_failures_are_told_apart_from_other_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    said = group_failure(RuntimeError(GLOO_RESET))
    assert said is not None and "\n" not in said
    assert "rank 0 of 2" in said and "Read error [127.0.0.1]:405: Connection reset by peer" in said
    assert "pair.cc" not in said and "typically" not in said
    assert group_failure(torch.distributed.DistBackendError("NCCL watchdog timeout")) is not None
    assert group_failure(RuntimeError("DataLoader timed out after 5 seconds")) is None
    # What gloo raises in DDP's buffer broadcast when the peer froze: no "gloo" in the text.
    assert group_failure(RuntimeError("Application timeout caused pair closure")) is not None
    assert group_failure(ValueError(GLOO_RESET)) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert group_failure(RuntimeError(GLOO_RESET)) is None


@pytest.mark.parametrize("then_sigterm", [False, True])
def test_a_group_failure_is_one_line_from_main(monkeypatch, capsys, then_sigterm):
    """The lost peer is the error, also when torchrun's SIGTERM (KeyboardInterrupt) comes
    while the process is already ending on it."""
    import feedtune.cli as cli

    def lost(**kwargs: Any) -> None:
        error = RuntimeError(GLOO_RESET)
        error.resume_hint = "feedtune train --resume abc"  # type: ignore[attr-defined]
        try:
            raise error
        finally:
            if then_sigterm:
                raise KeyboardInterrupt("signal 15")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "_call", lambda args: cli.Call(lost, {}))
    assert cli.main(["train", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("feedtune: error: process group:") and err.count("\n") == 1
    assert err.rstrip().endswith("resume with `feedtune train --resume abc`")


def test_a_sigterm_while_a_run_ends_comes_after_its_status(mlflow_store, monkeypatch):
    """torchrun's SIGTERM can reach rank 0 while it ends its run FAILED: the run still ends,
    then the signal is handled (the command's stop request set, the error going on)."""
    import os
    import signal

    import mlflow
    from mlflow.tracking import MlflowClient

    from feedtune.tracking import mlflow_store as store
    from feedtune.training.stopping import INTERRUPTED, StopRequest, stop_on_signals

    set_tags = mlflow.set_tags
    stop = StopRequest()
    before_status: list[bool] = []

    def tags_then_sigterm(tags):
        os.kill(os.getpid(), signal.SIGTERM)
        set_tags(tags)
        before_status.append(stop.requested)

    store.setup("sigterm-unit")  # this test's own store and experiment, whatever ran before
    previous = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(stop), pytest.raises(RuntimeError, match="Connection reset"):
        with store.start_run("train", system_metrics=False) as run:
            monkeypatch.setattr(mlflow, "set_tags", tags_then_sigterm)
            raise RuntimeError("Connection reset by peer")
    assert before_status == [False] and stop.reason == INTERRUPTED
    finished = MlflowClient().get_run(run.info.run_id)
    assert finished.info.status == "FAILED"
    assert finished.data.tags["feedtune.error"] == "RuntimeError: Connection reset by peer"
    assert signal.getsignal(signal.SIGTERM) is previous


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_train_is_one_run_with_whole_set_metrics(tmp_path, mlflow_store):
    import mlflow
    from mlflow.tracking import MlflowClient

    from feedtune.config import load_config as load_yaml_config
    from feedtune.training.checkpoint import load_checkpoint, model_from_checkpoint
    from feedtune.training.devices import prepare_model

    images = write_image_folder(tmp_path / "imgs", {"red": 29, "green": 15, "blue": 11})
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "experiment": "ddp",
                "augment": {"image_size": 32},
                "loader": {"batch_size": 8},
                "sampler": {"kind": "weighted", "weight_power": 0.5},
                "train": {"epochs": 2, "patience": 0, "measure_batches": 2},
            }
        )
    )
    env = {**env_with_src(), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": mlflow_store}
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
        *("--master-addr", "127.0.0.1", "--master-port", str(_free_port())),
        *("-m", "feedtune", "train", "--no-progress", "--config", str(config)),
        *("--set", f"data.path={images}", "--set", "train.lr_scaling=linear"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("finished (experiment 'ddp')") == 1  # one line, from rank 0

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["feedtune.world_size"] == "2"
    # The global batch is explicit: 2 processes x 8; linear scaling doubles train.lr.
    params = run.data.params
    assert params["global_batch_size"] == "16" and params["train.lr_scaling"] == "linear"
    assert float(params["lr_scaled"]) == pytest.approx(2 * float(params["train.lr"]))
    run_id = run.info.run_id
    best_epoch = int(run.data.metrics["best_epoch"])
    logged = {
        name: {m.step: m.value for m in client.get_metric_history(run_id, name)}[best_epoch]
        for name in ("val_loss", "val_acc", "val_f1_macro")
    }

    # One process evaluates the saved best weights on the run's own split and config.
    folder = Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "artifacts"))
    )
    cfg = load_yaml_config(folder / "config" / "resolved.yaml", [])
    data = prepare_data(cfg, progress=False)
    assert data.split.digest == run.data.tags["feedtune.split_digest"]
    assert len(data.split.val) % 2 == 1  # the two ranks' val shares differ in size
    logged_val = sorted(Path(p).name for p in _csv_paths(folder / "split" / "val.csv"))
    assert logged_val == sorted(Path(p).name for p in data.split.val["path"])
    model, _ = model_from_checkpoint(load_checkpoint(folder / "checkpoints" / "best.pt"))
    prepare_model(model, torch.device("cpu"), channels_last=cfg.train.channels_last)
    feed = build_feed(cfg, data, torch.device("cpu"))
    result = evaluate(
        model,
        feed.val,
        nn.CrossEntropyLoss(),
        device=torch.device("cpu"),
        num_classes=len(data.classes),
        progress=False,
    )
    assert result.loss == pytest.approx(logged["val_loss"], abs=1e-6)
    assert result.acc == pytest.approx(logged["val_acc"], abs=1e-6)
    assert result.f1_macro == pytest.approx(logged["val_f1_macro"], abs=1e-6)


def _csv_paths(path: Path) -> list[str]:
    import pandas as pd

    return pd.read_csv(path)["path"].tolist()


def _rank_process(agent: Any, rank: int, deadline: float) -> Any:
    """The worker torchrun's agent started for ``rank`` (a child of the agent whose
    environment says RANK=rank)."""
    import psutil

    while time.monotonic() < deadline:
        for child in psutil.Process(agent.pid).children():
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    raise AssertionError(f"torchrun started no process of rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_lost_rank_ends_the_others_within_the_timeout(tmp_path, mlflow_store, how):
    """Rank 1 killed (its sockets close: rank 0 fails at once) or frozen (alive to torchrun,
    silent to rank 0: its collective fails after train.dist_timeout_s) mid-run: rank 0 exits
    within the timeout (+ slack), saying why in one line (the lost peer, or torchrun's
    SIGTERM), torchrun exits non-zero, and rank 0's MLflow run is not left RUNNING."""
    import psutil
    from mlflow.tracking import MlflowClient

    timeout_s, slack_s = 20, 30
    images = write_image_folder(tmp_path / "imgs", {"red": 29, "green": 15, "blue": 11})
    config = tmp_path / "long.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "experiment": "ddp-kill",
                "augment": {"image_size": 32},
                "loader": {"batch_size": 8},
                "train": {"epochs": 500, "patience": 0, "measure_batches": 0},
            }
        )
    )
    env = {**env_with_src(), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": mlflow_store}
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
        *("--master-addr", "127.0.0.1", "--master-port", str(_free_port())),
        *("-m", "feedtune", "train", "--no-progress", "--config", str(config)),
        *("--set", f"data.path={images}", "--set", f"train.dist_timeout_s={timeout_s}"),
    ]
    err_path = tmp_path / "stderr.txt"
    client = MlflowClient()
    workers: list[psutil.Process] = []
    with open(err_path, "w") as err, reaped() as procs:
        agent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        procs.append(agent)
        try:
            deadline = time.monotonic() + 240
            run = None
            while run is None or "val_f1_macro" not in run.data.metrics:  # one epoch done
                assert agent.poll() is None, err_path.read_text()[-4000:]
                workers = psutil.Process(agent.pid).children()
                assert time.monotonic() < deadline, "no epoch logged within 240 s"
                time.sleep(0.5)
                experiment = client.get_experiment_by_name("ddp-kill")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                run = runs[0] if runs else None
            assert run.info.status == "RUNNING"
            victim, main = (_rank_process(agent, rank, deadline) for rank in (1, 0))
            lost_at = time.monotonic()
            os.kill(victim.pid, how)
            main.wait(timeout=timeout_s + slack_s)
            took = time.monotonic() - lost_at
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                victim.kill()  # a frozen rank would hold torchrun for its own grace period
            code = agent.wait(timeout=60)
        finally:
            for worker in workers:  # whatever happened, no rank keeps training
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    worker.kill()  # psutil checks that the pid is still this process
    stderr = err_path.read_text()
    assert code != 0 and took < timeout_s + slack_s, stderr[-4000:]
    said = [line for line in stderr.splitlines() if line.startswith("feedtune: ")]
    assert any(
        line.startswith("feedtune: error: process group: another process died")
        or line.startswith("feedtune: interrupted")
        for line in said
    ), stderr[-4000:]
    ended = client.get_run(run.info.run_id)
    assert ended.info.status in ("FAILED", "KILLED"), stderr[-4000:]
    if ended.info.status == "FAILED":  # the loop's stop request, not a bare RuntimeError
        assert ended.data.tags["feedtune.error"].startswith("PeerLost: process group: another")
