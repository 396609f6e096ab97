"""``benchmarks/gpu_check.py`` (``make gpu-check``): without CUDA it stops at once and writes
nothing; its budget, settings and summary helpers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, env_with_src

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_it_exits_3_at_once_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)],
        capture_output=True,
        text=True,
        env=env_with_src(),
        cwd=REPO,
        timeout=60,
    )
    assert time.monotonic() - start < 60
    assert proc.returncode == 3, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "gpu-check" in line]
    assert said == ["gpu-check: no CUDA device is present; nothing measured"]
    assert "no CUDA device" in said[0] and proc.stdout == ""
    assert not out.exists() or not any(out.iterdir())


def test_every_step_gets_its_plan_and_the_steps_end_within_the_budget(gpu_check) -> None:
    plan = list(gpu_check.PLAN.values())
    budget = 480.0
    left = budget - gpu_check.RESERVE_S
    assert sum(plan) == pytest.approx(left)
    # Every step using its whole time limit: each gets its plan, the last ends at the budget.
    limits = []
    for i in range(len(plan)):
        limits.append(gpu_check.step_timeout(left, plan[i:]))
        left -= limits[-1]
    assert limits == pytest.approx(plan)
    assert gpu_check.tune_timeout(limits[-1]) == pytest.approx(gpu_check.TUNE_S)
    # A step that ends early leaves its time to the next one only.
    assert gpu_check.step_timeout(460 - 10, plan[1:]) == pytest.approx(plan[1] + plan[0] - 10)
    # Less left than planned: each step its planned share.
    assert gpu_check.step_timeout(230, plan) == pytest.approx(plan[0] / 2)
    assert gpu_check.step_timeout(-5, plan) == 0.0


def test_loader_workers_leave_the_main_process_a_core(gpu_check) -> None:
    assert [gpu_check.loader_workers(n) for n in (1, 2, 4, 16, 64)] == [1, 1, 2, 8, 8]


def test_every_setting_is_a_config_key_with_a_valid_value(gpu_check, tmp_path: Path) -> None:
    from feedtune.cli import build_parser
    from feedtune.config import load_config

    for step in gpu_check.EXPERIMENTS:
        command = gpu_check.step_command(step, tmp_path, 8, 300.0)
        assert command[:3] == [sys.executable, "-m", "feedtune"]
        args = build_parser().parse_args(command[3:])
        cfg = load_config(REPO / "experiments" / "default.yaml", args.overrides)
        assert (cfg.model.name, cfg.augment.image_size, cfg.train.device) == (
            "resnet18",
            160,
            "cuda",
        )
        assert cfg.train.amp and cfg.train.channels_last and cfg.loader.num_workers == 8
        assert cfg.experiment == gpu_check.EXPERIMENTS[step]
        if step.startswith("train-"):
            assert cfg.train.epochs == 2 and cfg.augment.where == step.split("-")[1]
        if step == "bench":
            assert cfg.bench.num_workers == [0, 8] and cfg.bench.where == ["sample", "batch"]
        if step == "tune":
            assert args.timeout == gpu_check.TUNE_S
            assert args.storage == f"journal:{tmp_path / 'optuna.journal'}"


def test_cuda_tests_are_the_files_with_a_test_skipped_without_cuda(gpu_check) -> None:
    files = gpu_check.cuda_test_files(REPO / "tests")
    assert REPO / "tests" / "feed" / "augment" / "test_batch.py" in files
    assert Path(__file__) not in files
    command = gpu_check.step_command("cuda-tests", REPO, 1, 60.0)
    assert command[1:3] == ["-m", "pytest"] and command[-len(files) :] == [
        str(f.relative_to(REPO)) for f in files
    ]


def test_figures_and_summary_line(gpu_check) -> None:
    metrics = {"data_wait_frac": 0.25, "train_samples_per_s": 800.0, "model_samples_per_s": 1000.0}
    got = gpu_check.figures(metrics, {"feedtune.bottleneck": "loader"})
    assert got["train_over_model"] == pytest.approx(0.8) and got["verdict"] == "loader"
    line = gpu_check.summary_line({"step": "bench", "status": "ok", "seconds": 61.2, **got})
    assert line.split()[:4] == ["bench", "ok", "61", "s"]
    assert "data_wait_frac 0.250  train/model 0.80  verdict loader" in line
    # A speed trial records no model rate: the ratio and verdict are unknown, not zero.
    partial = gpu_check.figures({"data_wait_frac": 0.1, "train_samples_per_s": 5.0}, {})
    assert partial["train_over_model"] is None and partial["verdict"] is None
    line = gpu_check.summary_line(
        {"step": "tune", "status": "timeout", "seconds": 200, **partial, "note": "stopped"}
    )
    assert "train/model n/a  verdict n/a  (stopped)" in line
    tests = gpu_check.summary_line(
        {"step": "cuda-tests", "status": "ok", "seconds": 9, "note": "47 passed in 8.1s"}
    )
    assert "data_wait_frac" not in tests and tests.endswith("(47 passed in 8.1s)")


def test_summary_markdown_has_a_row_per_step(gpu_check) -> None:
    summary = {
        "device": "NVIDIA H200",
        "torch": "2.x",
        "cpus": 16,
        "budget_s": 480,
        "total_s": 470,
        "settings": gpu_check.model_settings(8),
        "steps": [
            {"step": "data", "status": "ok", "seconds": 20},
            {"step": "tune", "status": "skipped", "note": "no time left | none"},
        ],
    }
    text = gpu_check.summary_markdown(summary)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and rows[2].count("|") == rows[0].count("|")
    assert "--set model.name=resnet18" in text


def test_last_line_skips_blank_lines_and_pytest_rulers(gpu_check, tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("collected\n\n=========== 3 passed, 1 skipped in 2.0s ===========\n\n")
    assert gpu_check.last_line(log) == "3 passed, 1 skipped in 2.0s"
