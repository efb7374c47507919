"""The ML backend's answers to Label Studio, apart from HTTP: `/setup`, `/predict` and `/webhook` as plain dicts.

Each project that talks to the backend has its example set (`examples.ExampleSet`), read from the project's export
the first time (so a restarted backend, or one connected to a project that already has annotations, starts from
every annotation) and kept up to date by the webhook's annotation events. One worker thread does the work, in the
order it arrives: events are answered at once and applied behind; a prediction waits for the events before it.

Errors come back as `BackendError` with an HTTP status and one line; the server logs the line and answers
`{"error": line}`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from .client import ImageReadError, LabelStudioClient, LabelStudioError
from .config import LabelConfig, LabelConfigError, parse_label_config
from .examples import ExampleSet
from .regions import annotation_masks, prediction_results

logger = logging.getLogger("pipeline_diffews.label_studio")

SETUP_WAIT = 2.5  # seconds /setup waits for the worker (Label Studio gives it 3)
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
EVENTS = (*ANNOTATION_EVENTS, "ANNOTATIONS_DELETED", "TASKS_DELETED", "PROJECT_UPDATED", "PROJECT_DELETED",
          "START_TRAINING", "TASKS_CREATED")


class BackendError(Exception):
    """A request the backend cannot answer: `status` (HTTP) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Project:
    """What the backend knows of one project: its config, its example set, and the set's model version as of the
    worker's last change (read by /setup without waiting for the worker)."""

    id: int
    config: LabelConfig
    examples: ExampleSet
    version: str = ""


@dataclass(frozen=True)
class Settings:
    """How queries are segmented: `processing_resolution` (None: the model's), `threshold`, `threshold_mode` (None:
    the model's), `batch_size` (images per pipeline call), `max_shots` (the most recent shots each label uses)."""

    processing_resolution: int | None = None
    threshold: float | None = None
    threshold_mode: str | None = None
    batch_size: int = 4
    max_shots: int = 10


class Backend:
    """The backend of one model for any number of projects of one Label Studio.

    pipe: the DiffewSPipeline; client: the `LabelStudioClient` that reads projects and images; model_name: the
    first part of every model version.
    """

    def __init__(self, pipe, client: LabelStudioClient, model_name: str, settings: Settings = Settings()):
        self.pipe = pipe
        self.client = client
        self.model_name = model_name
        self.settings = settings
        self._projects: dict[int, Project] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffews-label-studio")
        self._waiting: dict[int, int] = {}  # project id -> events queued and not yet applied
        self._lock = threading.Lock()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- the protocol --

    def health(self) -> dict:
        return {"status": "UP", "model_class": "DiffewS", "model": self.model_name}

    def setup(self, payload: dict) -> dict:
        """`/setup`: {project: "<id>.<created>", schema: label config XML, ...} -> {model_version}. A project seen
        before, with no event waiting, answers at once. Otherwise the answer waits for the worker (the events before
        it, or the first read of the project) up to SETUP_WAIT seconds; past that, the work goes on behind and the
        answer is `<model>-pending`, a version no prediction has, so that Label Studio asks for every task it
        wants (each prediction then names its own version)."""
        project_id = _project_id(payload.get("project"))
        config = _config(payload.get("schema"))
        known = self._projects.get(project_id)
        same = known is not None and known.config.xml == config.xml
        if same and not self._waiting.get(project_id):
            return {"model_version": known.version}
        future = self._worker.submit(self._ensure, project_id, config)
        try:
            project = future.result(timeout=SETUP_WAIT)
        except FutureTimeout:
            return {"model_version": f"{self.model_name}-pending"}
        except LabelStudioError as error:
            raise BackendError(502, str(error)) from None
        return {"model_version": project.version}

    def predict(self, payload: dict) -> dict:
        """`/predict`: {tasks: [...], project: "<id>.<created>", label_config} -> {results: [one per task, in
        order]}, each {result: [regions], score, model_version}. A project without examples gets empty results."""
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) and "id" in t for t in tasks):
            raise BackendError(400, "/predict: `tasks` must be a list of tasks, each with an id")
        project_id = _project_id(payload.get("project") or (tasks[0].get("project") if tasks else None))
        config = _config(payload.get("label_config")) if payload.get("label_config") else None
        try:
            return self._worker.submit(self._predict, project_id, config, tasks).result()
        except LabelStudioError as error:
            raise BackendError(502, str(error)) from None

    def webhook(self, payload: dict) -> dict:
        """`/webhook`: queues the event and answers at once (Label Studio waits one second for it)."""
        action = payload.get("action")
        if action not in EVENTS:
            return {"status": "ignored", "action": action}
        project = payload.get("project")
        project_id = _project_id(project.get("id") if isinstance(project, dict) else project)
        with self._lock:
            self._waiting[project_id] = self._waiting.get(project_id, 0) + 1
        self._worker.submit(self._logged, self._event, action, project_id, payload)
        return {"status": "queued", "action": action}

    def train(self, payload: dict) -> dict:
        """`/train` (Label Studio's "Start training", or training on each submission when the project asks for it):
        reads the project's annotations again, behind; shots that did not change keep their caches."""
        project_id = _project_id(payload.get("project"))
        self._worker.submit(self._logged, self._read, project_id)
        return {"status": "queued"}

    # -- the worker's jobs --

    def _logged(self, job, *args):
        try:
            job(*args)
        except (LabelStudioError, BackendError) as error:
            logger.error("%s", error)
        except Exception:  # noqa: BLE001 - a bug: the worker must go on with the next job
            logger.exception("the backend failed on %s", args[0])
        finally:
            if job == self._event:
                with self._lock:
                    self._waiting[args[1]] -= 1

    def _ensure(self, project_id: int, config: LabelConfig | None = None) -> Project:
        """The project, read from Label Studio the first time or when its config changed."""
        project = self._projects.get(project_id)
        if project is None or (config is not None and config.xml != project.config.xml):
            project = self._read(project_id, config)
        return project

    def _read(self, project_id: int, config: LabelConfig | None = None) -> Project:
        """Reads the project's config (unless given) and every annotation (the export), and encodes them."""
        start = time.perf_counter()
        if config is None:
            config = _config(self.client.project(project_id).get("label_config"))
        examples = ExampleSet(self.pipe, self.model_name, self.client.read_image,
                              self.settings.processing_resolution, config.labels, self.settings.max_shots)
        key = config.data_keys[0]
        for task in self.client.export(project_id):
            for annotation in task.get("annotations") or []:
                if not annotation.get("was_cancelled"):
                    self._put(examples, config, annotation, task, key, project_id)
        old = self._projects.get(project_id)
        if old is not None and old.config.labels == config.labels:
            examples.adopt(old.examples)
        project = Project(project_id, config, examples)
        self._encode(project)
        self._projects[project_id] = project
        logger.info("project %d: %d example(s) read from Label Studio in %.1f s; model version %s", project_id,
                    len(examples), time.perf_counter() - start, project.version)
        return project

    def _put(self, examples: ExampleSet, config: LabelConfig, annotation: dict, task: dict, key: str,
             project_id: int) -> bool:
        """Adds (or replaces) the annotation's shot; an annotation with no usable mask removes it. Returns whether
        the set changed."""
        annotation_id = annotation.get("id")
        read = annotation_masks(annotation.get("result"), config)
        for problem in read.problems:
            logger.warning("project %d, annotation %s: %s", project_id, annotation_id, problem)
        url = (task.get("data") or {}).get(key)
        if not read.masks or not url:
            if not url:
                logger.warning("project %d, task %s: no image in data[%r]", project_id, task.get("id"), key)
            return examples.remove([annotation_id]) > 0
        return examples.put(annotation_id, task.get("id"), url, read.masks)

    def _encode(self, project: Project) -> None:
        """Encodes the shots added or changed, and publishes the set's version."""
        for problem in project.examples.encode_pending():
            logger.warning("project %d: %s", project.id, problem)
        project.version = project.examples.model_version

    def _event(self, action: str, project_id: int, payload: dict) -> None:
        if action == "PROJECT_DELETED":
            self._projects.pop(project_id, None)
            return
        project = self._projects.get(project_id)
        if project is None or action in ("START_TRAINING", "TASKS_CREATED"):
            # first contact, "Start training", or an import (whose tasks may hold annotations): read everything
            self._read(project_id)
            return
        if action == "PROJECT_UPDATED":
            xml = (payload.get("project") or {}).get("label_config")
            if xml and xml != project.config.xml:
                self._read(project_id)
            return
        examples, before = project.examples, project.version
        if action in ANNOTATION_EVENTS:
            annotations, tasks = _listed(payload.get("annotation")), _listed(payload.get("task"))
            by_id = {task.get("id"): task for task in tasks}
            for annotation in annotations:
                task = by_id.get(annotation.get("task")) or (tasks[0] if len(tasks) == 1 else {})
                if annotation.get("was_cancelled"):
                    examples.remove([annotation.get("id")])
                else:
                    self._put(examples, project.config, annotation, task, project.config.data_keys[0], project_id)
        elif action == "ANNOTATIONS_DELETED":
            examples.remove([item.get("id") for item in _listed(payload.get("annotations"))])
        elif action == "TASKS_DELETED":
            examples.remove_tasks([item.get("id") for item in _listed(payload.get("tasks"))])
        self._encode(project)
        if project.version != before:
            logger.info("project %d: %s -> %d example(s), model version %s", project_id, action, len(examples),
                        project.version)

    def _predict(self, project_id: int, config: LabelConfig | None, tasks: list[dict]) -> dict:
        start = time.perf_counter()
        project = self._ensure(project_id, config)
        self._encode(project)
        version, support = project.version, project.examples.support()
        answers = [{"result": [], "score": 0.0, "model_version": version} for _ in tasks]
        if support is None:
            logger.info("project %d: no example yet: %d empty prediction(s)", project_id, len(tasks))
            return {"results": answers}
        key, size, failures = project.config.data_keys[0], self.settings.batch_size, []
        for first in range(0, len(tasks), size):  # images are read a batch at a time
            images = {}
            for index in range(first, min(first + size, len(tasks))):
                task = tasks[index]
                try:
                    images[index] = self.client.read_image((task.get("data") or {}).get(key), task.get("id"))
                except ImageReadError as error:
                    failures.append(f"task {task.get('id')}: {error}")
                    logger.warning("project %d, %s", project_id, failures[-1])
            if not images:
                continue
            output = self.pipe(list(images.values()), support=support, output_type="np",
                               processing_resolution=support.processing_resolution, threshold=self.settings.threshold,
                               threshold_mode=self.settings.threshold_mode, batch_size=size)
            for j, index in enumerate(images):
                masks, scores = _label_masks(output, j)
                score = float(np.mean(list(scores.values()))) if scores else 0.0
                answers[index] = {"result": prediction_results(masks, scores, project.config), "score": score,
                                  "model_version": version}
        if tasks and len(failures) == len(tasks):
            raise BackendError(422, f"project {project_id}: no image could be read ({failures[0]})")
        logger.info("project %d: %d task(s) predicted with %d example(s) (%s) in %.1f s", project_id,
                    len(tasks) - len(failures), len(project.examples), version, time.perf_counter() - start)
        return {"results": answers}


def _label_masks(output, index: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The masks {label: bool [H, W]} of the labels found in query `index` of a multi-class output, and their scores
    (the mean probability of the label over its mask, in [0, 1])."""
    label_map, probabilities = output.label_maps[index], output.class_probabilities[index]
    masks, scores = {}, {}
    for k, (class_id, name) in enumerate(zip(output.class_ids, output.class_names)):
        mask = label_map == class_id
        if mask.any():
            masks[name], scores[name] = mask, float(probabilities[k][mask].mean())
    return masks, scores


def _project_id(value) -> int:
    """Label Studio's project as the backend gets it ("<id>.<created timestamp>", an int or a dict) -> the id."""
    if isinstance(value, dict):
        value = value.get("id")
    try:
        return int(str(value).split(".")[0])
    except ValueError:
        raise BackendError(400, f"no project id in the request (got {value!r})") from None


def _config(xml) -> LabelConfig:
    try:
        return parse_label_config(xml)
    except LabelConfigError as error:
        raise BackendError(400, f"label config: {error}") from None


def _listed(value) -> list[dict]:
    """A payload's item or list of items as a list of dicts."""
    items = value if isinstance(value, list) else [value] if value is not None else []
    return [item for item in items if isinstance(item, dict)]
