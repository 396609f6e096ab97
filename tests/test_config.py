import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from feedtune.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_override,
    with_overrides,
)
from feedtune.tuning.space import speed_space
from tests.conftest import REPO, env_with_src


def test_default_yaml_loads_and_is_short():
    text = (REPO / "experiments" / "default.yaml").read_text()
    cfg = load_config(REPO / "experiments" / "default.yaml")
    assert cfg.experiment == "feedtune-shapes"
    assert len([ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]) < 60


def test_set_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "loader.num_workers=2",
            "loader.pin_memory=true",
            "train.lr=0.01",
            "augment.mean=[0.5, 0.5, 0.5]",
        ],
    )
    assert cfg.loader.num_workers == 2 and cfg.loader.pin_memory is True
    assert cfg.train.lr == 0.01 and cfg.augment.mean == [0.5, 0.5, 0.5]


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 1e-3 as the string "1e-3"; users write it that way all the time.
    cfg = load_config(None, ["train.lr=1e-3", "search.train.lr={float: [1e-4, 1e-1], log: true}"])
    assert cfg.train.lr == 0.001
    assert (cfg.search.space["train.lr"].low, cfg.search.space["train.lr"].high) == (1e-4, 0.1)
    with pytest.raises(ConfigError, match="train.lr: got '1e-3x'"):
        load_config(None, ["train.lr=1e-3x"])


def test_yaml_file_overrides_defaults(tmp_path: Path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "loader:\n  batch_size: 8\nsearch:\n  loader.num_workers: {int: [0, 4]}\n"
        "  train.lr: {float: [1.0e-4, 1.0e-1], log: true}\n  n_trials_quality: 3\n"
    )
    cfg = load_config(path)
    assert cfg.loader.batch_size == 8 and cfg.loader.num_workers == 0
    assert cfg.search.space["loader.num_workers"].kind == "int"
    assert cfg.search.space["train.lr"].log is True
    assert cfg.search.n_trials_quality == 3
    assert set(speed_space(cfg.search)) == {"loader.num_workers"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loader.num_workerz=1", "loader.num_workerz"),
        ("loader.num_workers=-1", "loader.num_workers"),
        ("loader.num_workers=two", "expected an integer"),
        ("augment.policy=fancy", "allowed: none, basic"),
        ("optimizer.lr=1", "unknown key 'optimizer'"),
        ("split.val_fraction=1.5", "allowed range"),
        ("loader.pin_memory=3", "true or false"),
        ("search.loader.workers={int: [0, 2]}", "loader.workers"),
        ("search.loader.cache={choice: [none, gpu]}", "loader.cache"),
        ("search.train.lr={float: [0, 1], log: true}", "log scale"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        load_config(None, [override])


def test_unknown_key_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"loader": {"workers": 2}})
    assert "loader.workers" in str(err.value) and "num_workers" in str(err.value)


def test_unknown_top_level_key_in_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="trainer"):
        load_config(path)


def test_round_trip_through_yaml(tmp_path: Path):
    cfg = load_config(
        None, ["loader.num_workers=3", "search.augment.policy={choice: [none, basic]}"]
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg


def test_flat_params_and_replace():
    cfg = Config()
    flat = cfg.flat()
    assert flat["loader.num_workers"] == 0 and "search.n_trials_speed" not in flat
    changed = with_overrides(cfg, {"loader.num_workers": 2})
    assert changed.loader.num_workers == 2 and cfg.loader.num_workers == 0
    with pytest.raises(ConfigError):
        with_overrides(cfg, {"loader.num_workers": -3})


def test_parse_override_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("loader.num_workers")


@pytest.mark.parametrize(
    ("args", "named", "also"),
    [
        (["--set", "loader.num_workers=-1"], "loader.num_workers", "allowed range [0, 256]"),
        (["--set", "loader.workers=2"], "loader.workers", "num_workers"),
        (["--config", "{tmp}/no-such.yaml"], "{tmp}/no-such.yaml", "not found"),
    ],
    ids=["out-of-range", "unknown-key", "missing-config-file"],
)
def test_a_config_error_exits_2_with_one_line_naming_the_key(tmp_path: Path, args, named, also):
    """`feedtune train` in a fresh process: cli.main turns every ConfigError (a bad value, an
    unknown key, a config file that does not exist) into exit status 2 and one
    `feedtune: config error:` line, before any store or dataset is touched."""
    args = [a.format(tmp=tmp_path) for a in args]
    env = {
        **env_with_src(),
        # Were the error missed, nothing of the checkout is written: a store and a project root
        # of the test's own.
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "FEEDTUNE_HOME": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "feedtune", "train", "--no-progress", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("feedtune:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("feedtune: config error: ")
    assert named.format(tmp=tmp_path) in lines[0] and also in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ([], "feedtune-shapes"),
        (["data.name=shapes-shift"], "feedtune-shapes-shift"),
        (["data.path={tmp}/my_images"], "feedtune-my_images"),
        (["data.path={tmp}/my_images/"], "feedtune-my_images"),
        (["data.path=my_images"], "feedtune-my_images"),
        (["data.path={tmp}/pets/manifest.csv"], "feedtune-pets"),
        (["data.path={tmp}/pets/labels-2024.csv"], "feedtune-labels-2024"),
        (["data.path=mydata.pets:make_dataset"], "feedtune-mydata.pets.make_dataset"),
        (["data.path='{tmp}/my photos: 2024'"], "feedtune-my-photos-2024"),
        (["data.path={tmp}/my_images", "experiment=mine"], "mine"),
        (["data.path={tmp}/my_images", "experiment=feedtune-shapes"], "feedtune-shapes"),
    ],
)
def test_the_experiment_is_named_after_the_data_unless_named(
    tmp_path, monkeypatch, settings, expected
):
    monkeypatch.chdir(tmp_path)
    settings = [s.format(tmp=tmp_path) for s in settings]
    assert load_config(REPO / "experiments" / "default.yaml", settings).experiment == expected
    assert load_config(None, settings).experiment == expected


def test_an_experiment_named_in_a_file_wins_and_a_resolved_config_keeps_its_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("experiment: mine\n")
    assert load_config(path, [f"data.path={tmp_path / 'imgs'}"]).experiment == "mine"
    named = load_config(None, [f"data.path={tmp_path / 'imgs'}"])
    path.write_text(named.to_yaml())  # what a run logs as config/resolved.yaml
    assert load_config(path, [f"data.path={tmp_path / 'other'}"]).experiment == "feedtune-imgs"
    with pytest.raises(ConfigError, match="experiment: got an empty name"):
        load_config(None, ["experiment=''"])


def test_the_default_configs_ship_in_the_package_as_the_checkout_files():
    """One copy: the package's default configs are links to experiments/, which the wheel
    carries as files (tests/test_packaging.py builds it)."""
    from feedtune.config.sections import PACKAGED_CONFIGS

    for name in ("default.yaml", "finetune-shapes-shift.yaml"):
        assert (PACKAGED_CONFIGS / name).samefile(REPO / "experiments" / name)
    cfg = load_config(PACKAGED_CONFIGS / "default.yaml")
    assert cfg.search.space and cfg.experiment == "feedtune-shapes"
    assert "experiment" not in yaml.safe_load((PACKAGED_CONFIGS / "default.yaml").read_text())
