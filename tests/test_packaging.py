"""The MLflow project, the package and the docs agree with each other."""

import re
import subprocess
import sys
import tomllib

import yaml

from tests.conftest import REPO, env_with_src


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
