"""The MLflow project, the package and the docs agree with each other."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, env_with_src, write_image_folder


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0].lower()


def test_conda_env_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip = next(d for d in conda["dependencies"] if isinstance(d, dict))["pip"]
    conda_specs = sorted(s.replace(" ", "") for s in pip if not s.startswith("-e"))
    assert conda_specs == sorted(s.replace(" ", "") for s in project["dependencies"])


def test_the_timm_extra_is_tested():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["timm"] and set(extras["timm"]) <= set(extras["test"])
    assert "timm" not in {_name(s) for s in project["dependencies"]}  # optional, imported lazily


def test_the_hf_extra_is_tested_and_feedtune_runs_without_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["hf"] and set(extras["hf"]) <= set(extras["test"])
    assert "datasets" not in {_name(s) for s in project["dependencies"]}
    # Every source is dispatched from prepare: datasets is imported only for a Hugging Face one.
    code = "import sys, feedtune.sources.prepare; sys.exit('datasets' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], env=env_with_src(), cwd=REPO)
    assert proc.returncode == 0


def test_mlproject_declares_every_command_and_main_is_tune():
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    points = spec["entry_points"]
    assert {"main", "data", "train", "bench", "tune", "finetune", "best"} <= set(points)
    assert points["main"]["command"] == points["tune"]["command"]
    for name, point in points.items():
        assert f"feedtune {'tune' if name == 'main' else name}" in point["command"]
        for param, decl in point.get("parameters", {}).items():
            assert f"{{{param}}}" in point["command"], (name, param)
            assert decl["type"] in {"string", "float", "path", "uri"}


def test_readme_quick_start_has_exactly_the_two_commands():
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert commands == ["make tune", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_python_m_feedtune_works():
    import subprocess
    import sys

    from tests.conftest import env_with_src

    proc = subprocess.run(
        [sys.executable, "-m", "feedtune", "--help"],
        capture_output=True,
        text=True,
        env=env_with_src(),
        cwd=REPO,
    )
    assert proc.returncode == 0 and "train" in proc.stdout


def test_dependency_floors_are_past_known_holes_and_met_by_what_the_tests_run_on():
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(spec).name: Requirement(spec) for spec in project["dependencies"]}
    safe = {"torch": "2.6", "pillow": "10.0.1", "mlflow": "3.0", "optuna": "4.0"}
    for name, first_safe in safe.items():
        floors = [Version(s.version) for s in reqs[name].specifier if s.operator == ">="]
        assert floors and min(floors) >= Version(first_safe), (name, str(reqs[name].specifier))
    for name, req in reqs.items():
        installed = version(name).split("+")[0]
        assert req.specifier.contains(installed, prereleases=True), (name, installed)


def _wheel_in_fresh_venv(tmp: Path) -> Path:
    """The wheel (`pip wheel`, no editable install) in a new venv; its dependencies come from
    the test venv through a .pth line (no download), feedtune only from the wheel. The build
    runs on a copy of the sources, so the checkout gets no build/ or egg-info from it."""
    tree = tmp / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", tree / "src", symlinks=True, ignore=skip)
    shutil.copytree(REPO / "experiments", tree / "experiments")
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(tree)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("feedtune-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True)
    deps = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (Path(site.stdout.strip()) / "feedtune-test-deps.pth").write_text("\n".join(sorted(deps)))
    return venv


@pytest.mark.slow
def test_the_installed_wheel_tunes_a_users_folder_with_the_default_search_space(tmp_path):
    """`pip install` of the wheel, then `feedtune tune --set data.path=my_images` in a folder
    of the user's (FEEDTUNE_HOME): the default config comes with the package, so the trials
    search its space, and the runs and model are named after the folder."""
    venv = _wheel_in_fresh_venv(tmp_path)
    home = tmp_path / "home"
    write_image_folder(home / "my_images", {"a": 12, "b": 12}, size=(32, 32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FEEDTUNE_"))}
    env.pop("PYTHONPATH", None)
    env.update(FEEDTUNE_HOME=str(home), OMP_NUM_THREADS="1")
    code = "from feedtune.config import DEFAULT_CONFIG_PATH as p; print(p)"
    where = subprocess.run(
        [venv / "bin" / "python", "-c", code], cwd=home, env=env, capture_output=True, text=True
    )
    packaged = Path(where.stdout.strip())
    assert packaged.is_relative_to(venv) and not packaged.is_symlink(), where
    assert packaged.read_text() == (REPO / "experiments" / "default.yaml").read_text()

    tiny = ["train.epochs=1", "train.measure_batches=0", "augment.image_size=32", "model.width=8"]
    tiny += ["search.speed_steps=3", "search.speed_skip_wait_frac=0", "search.noise_seeds=0"]
    tiny += ["search.recheck_seeds=0"]
    cmd = [venv / "bin" / "feedtune", "tune", "--no-progress", "--n-trials", "2"]
    cmd += ["--set", "data.path=my_images", *(f"--set={s}" for s in tiny)]
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (settings,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("settings:")]
    assert "--set " in settings, proc.stdout

    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(home / "optuna.journal"))
    )
    for stage in ("speed", "quality"):
        study = optuna.load_study(study_name=f"feedtune-my_images-{stage}", storage=storage)
        trials = study.get_trials(deepcopy=False)
        assert trials and all(t.params for t in trials), (stage, trials)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    assert client.get_experiment_by_name("feedtune-my_images") is not None
    assert client.get_experiment_by_name("feedtune-shapes") is None
    assert client.get_model_version_by_alias("feedtune-my_images", "best").run_id
