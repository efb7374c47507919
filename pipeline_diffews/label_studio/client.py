"""Reading a project's annotations and images from Label Studio over its HTTP API (httpx).

The API key is a personal access token (a JWT refresh token, exchanged at `/api/token/refresh/` for short-lived
access tokens, sent as `Bearer`) or a legacy token (sent as `Token`). Task images are Label Studio URLs
(`/data/upload/...`, `/data/local-files/?d=...`, read with the key), cloud storage URIs (`s3://...`, resolved by
Label Studio's `/tasks/<id>/resolve/`), other http(s) URLs (read without the key) or `data:` URIs.
"""

from __future__ import annotations

import base64
import io
import urllib.parse

import httpx
import PIL.Image
import PIL.ImageOps

TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class LabelStudioError(RuntimeError):
    """Label Studio could not be read (unreachable, a refused key, a missing project); one line naming the problem."""


class ImageReadError(ValueError):
    """A task's image could not be read or decoded; one line naming the image."""


class LabelStudioClient:
    """The part of Label Studio's API the backend uses. `url`: where Label Studio is served (e.g.
    http://localhost:8080); `api_key`: a personal access token or a legacy token."""

    def __init__(self, url: str, api_key: str, timeout: httpx.Timeout = TIMEOUT):
        self.url = url.rstrip("/")
        self.api_key = api_key.strip()
        self._http = httpx.Client(timeout=timeout, follow_redirects=True)
        self._access = None  # the access token of a personal access token, refreshed when refused

    @property
    def is_personal_token(self) -> bool:
        return self.api_key.count(".") == 2  # a JWT: header.payload.signature

    def close(self) -> None:
        self._http.close()

    # -- the API --

    def whoami(self) -> dict:
        """The user the key belongs to (`GET /api/current-user/whoami`)."""
        return self._get_json("/api/current-user/whoami")

    def project(self, project_id: int) -> dict:
        """The project (`GET /api/projects/<id>`), with its `label_config`."""
        return self._get_json(f"/api/projects/{project_id}")

    def export(self, project_id: int) -> list[dict]:
        """Every task of the project that has annotations, with them (`GET /api/projects/<id>/export`, JSON)."""
        tasks = self._get_json(f"/api/projects/{project_id}/export", params={"exportType": "JSON"})
        if not isinstance(tasks, list):
            raise LabelStudioError(f"the export of project {project_id} is not a list of tasks")
        return tasks

    def read_image(self, url: str, task_id: int | None = None) -> PIL.Image.Image:
        """A task's image, RGB, EXIF orientation applied (as Label Studio's page shows it). Raises ImageReadError."""
        try:
            data = self._image_bytes(url, task_id)
            with PIL.Image.open(io.BytesIO(data)) as image:
                return PIL.ImageOps.exif_transpose(image).convert("RGB")
        except LabelStudioError as error:
            raise ImageReadError(f"image {_short(url)}: {error}") from None
        except (OSError, ValueError) as error:
            message = f"not a readable image ({type(error).__name__}: {error})"
            raise ImageReadError(f"image {_short(url)}: {message}") from None

    # -- internals --

    def _image_bytes(self, url: str, task_id: int | None) -> bytes:
        if not isinstance(url, str) or not url:
            raise ValueError("the task has no image URL")
        if url.startswith("data:"):
            return base64.b64decode(url.partition(",")[2])
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme in ("", "http", "https") and (not scheme or url.startswith(self.url + "/")):
            return self._request("GET", url if scheme else self.url + "/" + url.lstrip("/")).content
        if scheme in ("http", "https"):  # another server: the key is not sent there
            response = self._fetch(url, headers={})
            if response.status_code >= 400:
                raise LabelStudioError(f"{_short(url)} answered {response.status_code}")
            return response.content
        if task_id is None:
            raise ValueError(f"a {scheme}:// URI is resolved through its task, and none was given")
        fileuri = base64.urlsafe_b64encode(url.encode()).decode()
        return self._request("GET", f"{self.url}/tasks/{task_id}/resolve/", params={"fileuri": fileuri}).content

    def _get_json(self, path: str, params: dict | None = None):
        response = self._request("GET", self.url + path, params=params)
        try:
            return response.json()
        except ValueError:
            raise LabelStudioError(f"{self.url}{path} did not answer JSON (is {self.url} Label Studio?)") from None

    def _request(self, method: str, url: str, **kwargs) -> httpx.Response:
        response = self._fetch(url, method=method, headers={"Authorization": self._authorization()}, **kwargs)
        if response.status_code == 401 and self.is_personal_token:  # the access token expired: one refresh
            self._access = None
            response = self._fetch(url, method=method, headers={"Authorization": self._authorization()}, **kwargs)
        if response.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio at {self.url} refused the API key ({response.status_code}): set LABEL_STUDIO_API_KEY "
                "to a personal access token or legacy token of a user of the project (Account & Settings)"
            )
        if response.status_code == 404:
            raise LabelStudioError(f"{_short(url)} is not found on Label Studio at {self.url} (404)")
        if response.status_code >= 400:
            raise LabelStudioError(f"Label Studio at {self.url} answered {response.status_code} to {_short(url)}")
        return response

    def _authorization(self) -> str:
        if not self.is_personal_token:
            return f"Token {self.api_key}"
        if self._access is None:
            response = self._fetch(f"{self.url}/api/token/refresh/", method="POST", json={"refresh": self.api_key})
            if response.status_code != 200 or "access" not in _json_or_empty(response):
                raise LabelStudioError(
                    f"Label Studio at {self.url} refused the personal access token ({response.status_code}): set "
                    "LABEL_STUDIO_API_KEY to a valid token (Account & Settings > Personal Access Token)"
                )
            self._access = response.json()["access"]
        return f"Bearer {self._access}"

    def _fetch(self, url: str, method: str = "GET", **kwargs) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.HTTPError as error:
            raise LabelStudioError(
                f"cannot reach {_short(url)} ({type(error).__name__}: {error}); is LABEL_STUDIO_URL={self.url} right "
                "and Label Studio running?"
            ) from None


def _json_or_empty(response: httpx.Response) -> dict:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _short(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."
