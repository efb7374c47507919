"""A real Label Studio for the tests: installed from PyPI into its own virtual environment (cached), started on
127.0.0.1 with a user and a legacy token from environment variables, and driven through its HTTP API.

The environment is `DIFFEWS_LABEL_STUDIO_VENV` (default: pytest's cache folder, `.pytest_cache/d/label-studio-<v>`
under the repository); installing it takes about a minute and 1 GB, once. Without network to PyPI (and no cached
environment) the tests that need it are skipped, unless DIFFEWS_REQUIRE_LABEL_STUDIO=1 (as CI sets it) makes that a
failure.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.training_runs import free_port

LABEL_STUDIO = "label-studio==1.23.2"
LABEL_STUDIO_SDK = "label-studio-sdk==2.1.2"
# Label Studio 1.23.2 passes `send_default_pii` to sentry_sdk.init, an option sentry-sdk 3 refuses at start.
LABEL_STUDIO_PINS = ("sentry-sdk<3",)
USER, PASSWORD = "annotator@example.com", "diffews-test-password"
TOKEN = "d1ffe5d1ffe5d1ffe5d1ffe5d1ffe5d1ffe5d1ff"  # the user's legacy token (40 hex digits)
START_TIMEOUT = 300  # seconds: a fresh data folder runs every database migration (about 30 s on 2 cores)


def require_label_studio(reason: str):
    """Skips the test, or fails it when DIFFEWS_REQUIRE_LABEL_STUDIO=1."""
    message = f"{reason} (DIFFEWS_REQUIRE_LABEL_STUDIO=1 makes this a failure)"
    if os.environ.get("DIFFEWS_REQUIRE_LABEL_STUDIO") == "1":
        pytest.fail(message)
    pytest.skip(message)


def label_studio_venv(default: Path) -> Path:
    """The virtual environment holding Label Studio (installed into it the first time): DIFFEWS_LABEL_STUDIO_VENV,
    else `default`. Skips (or fails, see `require_label_studio`) when it cannot be installed."""
    venv = Path(os.environ.get("DIFFEWS_LABEL_STUDIO_VENV") or default)
    done = venv / "installed.txt"
    wanted = " ".join([LABEL_STUDIO, LABEL_STUDIO_SDK, *LABEL_STUDIO_PINS])
    if done.is_file() and done.read_text().strip() == wanted:
        return venv
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", LABEL_STUDIO,
         LABEL_STUDIO_SDK, *LABEL_STUDIO_PINS], capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if not line.startswith("WARNING: Location")]
        require_label_studio(f"cannot install {LABEL_STUDIO} into {venv}: {' '.join(errors[-3:])[-500:]}")
    done.write_text(wanted + "\n")
    return venv


def wait_for(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    """Waits until `url` answers 200; fails with the log's end when the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url}: the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_label_studio(venv: Path, data_dir: Path):
    """Label Studio served on a free 127.0.0.1 port from `data_dir`, with the user USER and legacy token TOKEN; yields
    its API (`LabelStudioAPI`). Local ML backends are allowed (ML_BLOCK_LOCAL_IP, SSRF_PROTECTION_ENABLED)."""
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_USERNAME": USER,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
    }
    log = data_dir / "label-studio.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(venv / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port",
             str(port), "--data-dir", str(data_dir)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=data_dir)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/health", process, START_TIMEOUT, log)
        yield LabelStudioAPI(url, TOKEN)
    finally:
        stop(process)


class LabelStudioAPI:
    """The calls a person's clicks make, through Label Studio's HTTP API with the legacy token."""

    def __init__(self, url: str, token: str):
        self.url = url
        self.token = token
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=300)

    def call(self, method: str, path: str, **kwargs):
        response = self.http.request(method, path, **kwargs)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text[:1000]}"
        return response.json() if response.content else None

    def create_project(self, title: str, label_config: str) -> int:
        return self.call("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"]

    def import_images(self, project: int, paths: list[Path]) -> dict[str, int]:
        """Uploads images as tasks (one form field per file); returns {file name: task id} of the project's uploads
        (stored as /data/upload/<project>/<prefix>-<file name>)."""
        files = {f"file{i}": (path.name, path.read_bytes(), "image/png") for i, path in enumerate(paths)}
        self.call("POST", f"/api/projects/{project}/import", files=files)
        return {task["data"]["image"].rsplit("-", 1)[-1]: task["id"] for task in self.tasks(project)}

    def import_tasks(self, project: int, tasks: list[dict]) -> None:
        """Imports tasks as JSON: [{"data": {...}, "annotations": [...]}, ...]."""
        self.call("POST", f"/api/projects/{project}/import", json=tasks)

    def tasks(self, project: int) -> list[dict]:
        return self.call("GET", "/api/tasks", params={"project": project, "page_size": 1000})["tasks"]

    def annotate(self, task: int, result: list[dict]) -> int:
        return self.call("POST", f"/api/tasks/{task}/annotations/", json={"result": result})["id"]

    def update_annotation(self, annotation: int, result: list[dict]) -> None:
        self.call("PATCH", f"/api/annotations/{annotation}/", json={"result": result})

    def delete_annotation(self, annotation: int) -> None:
        self.call("DELETE", f"/api/annotations/{annotation}/")

    def connect_backend(self, project: int, url: str) -> int:
        return self.call("POST", "/api/ml", json={"project": project, "url": url, "title": "DiffewS"})["id"]

    def retrieve_predictions(self, project: int, tasks: list[int]) -> None:
        """The data manager's "Retrieve predictions" action on these tasks."""
        self.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                  json={"selectedItems": {"all": False, "included": tasks}})

    def predictions(self, task: int) -> list[dict]:
        return self.call("GET", "/api/predictions", params={"task": task})

    def personal_access_token(self) -> str:
        """A new personal access token of the user (a JWT refresh token)."""
        return self.call("POST", "/api/token/")["token"]

    def delete_predictions(self, task: int) -> None:
        for prediction in self.predictions(task):
            self.call("DELETE", f"/api/predictions/{prediction['id']}/")


@contextlib.contextmanager
def running_backend(model: Path, label_studio_url: str, api_key: str, log: Path, port: int | None = None):
    """`python -m pipeline_diffews label-studio --model MODEL` on 127.0.0.1:`port` (default: a free one), as a
    subprocess; yields its URL. Its log (stdout and stderr) goes to `log`."""
    port = port or free_port()
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio_url, "LABEL_STUDIO_API_KEY": api_key}
    with open(log, "a") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline_diffews", "label-studio", "--model", str(model), "--port", str(port),
             "--device", "cpu"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/health", process, 120, log)
        yield url
    finally:
        stop(process)
