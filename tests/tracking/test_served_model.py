"""The model registered as ``<experiment>@best`` served by MLflow: encoded images in, ``label``
and ``probabilities`` out, the same answer ``feedtune.load_best(...).predict`` gives.

One tiny run trains in-process (32 px, one epoch) and is registered; the server test then runs
a real ``mlflow models serve`` process against the same SQLite store."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from PIL import Image

import feedtune
from feedtune.commands.train import run_train
from feedtune.config import load_config
from feedtune.sources.imageio import BadImageError, decode_image
from feedtune.tracking import mlflow_models
from feedtune.tracking import mlflow_store as tracking
from feedtune.training.checkpoint import CheckpointError
from feedtune.training.model_bundle import FACTORY_ENV, SPEC_FILE, WEIGHTS_FILE
from tests.conftest import (
    encoded_image,
    env_with_src,
    single_torch_thread,
    tiny_checkpoint,
    write_image_folder,
)

pytestmark = pytest.mark.slow

NAME = "served"
TINY = [
    "augment.image_size=32",
    "train.epochs=1",
    "train.measure_batches=0",
    "train.patience=0",
    "loader.batch_size=16",
    "split.val_fraction=0.25",
    f"experiment={NAME}",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, _empty_mlflow_db: Path):
    """A trained run registered as ``served@best`` in a temporary SQLite store, and
    ``load_best`` of it."""
    tmp = tmp_path_factory.mktemp("served")
    shutil.copy(_empty_mlflow_db, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    # 120x100 JPEGs: large enough for reduced-scale decoding at image_size 32, which the
    # served model must reproduce.
    counts = {"red": 12, "green": 12, "blue": 12}
    data = write_image_folder(tmp / "colours", counts, size=(120, 100))
    with pytest.MonkeyPatch.context() as mp, single_torch_thread():
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        run_id = run_train(load_config(None, [*TINY, f"data.path={data}"]), progress=False)
        moved, _ = mlflow_models.register_if_better(run_id, NAME, metric="best_val_f1_macro")
        assert moved
        best = feedtune.load_best(NAME, uri, device="cpu")
        yield SimpleNamespace(uri=uri, data=data, best=best, run_id=run_id)
        while mlflow.active_run() is not None:
            mlflow.end_run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, path: str, body: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _wait_until_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {log.read_text()[-3000:]}")
        try:
            if _request(port, "/ping")[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow models serve not ready in {timeout} s: {log.read_text()[-3000:]}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")  # as `base64 -w0` writes it


def _png_of(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(decode_image(path)).save(buf, format="PNG")
    return buf.getvalue()


def test_mlflow_models_serve_answers_images_as_load_best_predicts_them(served, tmp_path):
    jpeg = served.data / "red" / "red_000.jpg"
    png = _png_of(served.data / "blue" / "blue_000.jpg")
    port = _free_port()
    env = env_with_src()
    bin_dir = str(Path(sys.executable).parent)  # the server starts `uvicorn` from PATH
    env = {
        **env,
        "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
        "MLFLOW_TRACKING_URI": served.uri,
        "OMP_NUM_THREADS": "1",
        # The served model's files are data: MLflow must not need to unpickle anything.
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
    }
    log = tmp_path / "serve.log"
    cmd = [str(Path(bin_dir) / "mlflow"), "models", "serve"]
    cmd += ["-m", f"models:/{NAME}@best", "--env-manager", "local", "-h", "127.0.0.1"]
    cmd += ["-p", str(port)]
    with open(log, "w") as out:
        # Its own session: the server's workers are killed with it, whatever ends the test.
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_ready(proc, port, log, timeout=45)
        # The JPEG file's bytes, base64, as `dataframe_split` (MLflow decodes binary columns).
        status, text = _request(
            port,
            "/invocations",
            {"dataframe_split": {"columns": ["image"], "data": [[_b64(jpeg.read_bytes())]]}},
        )
        assert status == 200, text
        (row,) = json.loads(text)["predictions"]
        labels, probs = served.best.predict(jpeg)
        assert row["label"] == labels[0]
        assert np.allclose(row["probabilities"], probs[0], atol=1e-5)
        assert len(row["probabilities"]) == len(served.best.classes)

        # PNG bytes as `dataframe_records`, two in one request.
        records = [{"image": _b64(png)}, {"image": _b64(jpeg.read_bytes())}]
        status, text = _request(port, "/invocations", {"dataframe_records": records})
        assert status == 200, text
        rows = json.loads(text)["predictions"]
        labels, probs = served.best.predict([png, jpeg])
        assert [r["label"] for r in rows] == labels
        assert np.allclose([r["probabilities"] for r in rows], probs, atol=1e-5)

        # Bytes that are no image: a 400 whose message (not just its trace) says why; it lives on.
        body = {"dataframe_records": [{"image": _b64(b"not an image at all")}]}
        status, text = _request(port, "/invocations", body)
        assert status == 400, text
        error = json.loads(text)
        assert error["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "bad image #0 (19 bytes): not an image" in error["message"]
        assert _request(port, "/ping")[0] == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_pyfunc_answers_png_bytes_paths_and_arrays_as_load_best_and_refuses_non_images(
    served, tmp_path
):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@best")
    files = [served.data / c / f"{c}_001.jpg" for c in ("red", "green", "blue")]
    pngs = [_png_of(p) for p in files]
    out = model.predict(pd.DataFrame({"image": pngs}))
    assert list(out.columns) == ["label", "probabilities"]
    labels, probs = served.best.predict(pngs)
    assert list(out["label"]) == labels
    assert np.allclose(np.stack(out["probabilities"]), probs, atol=1e-5)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    # The same images from PNG files: decoded alike.
    for i, data in enumerate(pngs):
        (tmp_path / f"{i}.png").write_bytes(data)
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    out = model.predict(pd.DataFrame({"image": paths}))
    assert np.allclose(np.stack(out["probabilities"]), probs, atol=1e-5)

    # JPEG paths and decoded arrays answer as load_best answers them.
    out = model.predict(pd.DataFrame({"image": [str(p) for p in files]}))
    labels, probs = served.best.predict(files)
    assert list(out["label"]) == labels
    assert np.allclose(np.stack(out["probabilities"]), probs, atol=1e-5)
    arrays = [decode_image(p) for p in files]
    out = model.predict(pd.DataFrame({"image": arrays}))
    assert np.allclose(np.stack(out["probabilities"]), served.best.predict(arrays)[1], atol=1e-5)

    # The class names travel with the model.
    assert model.metadata.metadata["classes"] == served.best.classes == ["blue", "green", "red"]

    # A bad request is MLflow's invalid-parameter error, its message the reason.
    with pytest.raises(MlflowException, match=r"bad image #1 \(5 bytes\): not an image") as info:
        model.predict(pd.DataFrame({"image": [pngs[0], b"hello"]}))
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert isinstance(info.value.__cause__, BadImageError)


def test_the_logged_model_is_code_plus_data_with_a_real_image_example(served, tmp_path):
    folder = Path(
        mlflow.artifacts.download_artifacts(
            run_id=served.run_id, artifact_path="model", dst_path=str(tmp_path)
        )
    )
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["model_code_path"].endswith("served_model.py")  # models-from-code
    assert "python_model" not in pyfunc  # no pickled PythonModel
    names = {p.name for p in folder.rglob("*") if p.is_file()}
    assert {WEIGHTS_FILE, SPEC_FILE, "served_model.py"} <= names
    assert not any(n.endswith((".pkl", ".pickle", ".cloudpickle")) for n in names)
    spec = json.loads(next(folder.rglob(SPEC_FILE)).read_text())
    assert spec["classes"] == ["blue", "green", "red"]
    assert spec["model_args"]["name"] == "small_cnn"
    assert spec["eval_transform"]["image_size"] == 32
    # The input example is an encoded image that decodes, small.
    example = json.loads((folder / "input_example.json").read_text())
    (encoded,) = example["data"][0]
    data = base64.b64decode(encoded)
    assert data[:2] == b"\xff\xd8" and len(data) < 20_000
    (column,) = json.loads(mlmodel["signature"]["inputs"])
    assert column == {"type": "binary", "name": "image", "required": True}


FACTORY_MODULE = """
from pathlib import Path

from torch import nn

Path(__file__).with_suffix(".imported").write_text("imported")


def make(num_classes, width=4):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, num_classes),
    )
"""


def test_a_factory_network_is_served_only_where_the_factory_is_named(
    mlflow_store, tmp_path, monkeypatch
):
    module = f"servedzoo_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(FACTORY_ENV, raising=False)
    name = f"{module}:make"
    tracking.setup("factory")
    with tracking.start_run("train", system_metrics=False) as run:
        # The run named its factory in its own config: logging it (and MLflow's check of the
        # input example) may import it here.
        payload = tiny_checkpoint(("a", "b"), f"model.name={name}", "model.kwargs.width=3")
        mlflow_models.log_model(payload, encoded_image(fmt="PNG"))
    assert os.environ.get(FACTORY_ENV) is None  # trusted only while logging
    sys.modules.pop(module, None)
    (tmp_path / f"{module}.imported").unlink()

    uri = f"runs:/{run.info.run_id}/model"
    with pytest.raises(CheckpointError, match=f"set {FACTORY_ENV}={name} where"):
        mlflow.pyfunc.load_model(uri)
    assert not (tmp_path / f"{module}.imported").exists()  # refused before any import

    monkeypatch.setenv(FACTORY_ENV, name)
    out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [encoded_image(fmt="PNG")]}))
    assert out["label"][0] in ("a", "b") and len(out["probabilities"][0]) == 2
