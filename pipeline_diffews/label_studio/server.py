"""The ML backend's HTTP face (FastAPI, served by uvicorn): Label Studio's ML backend protocol.

    GET  /health, GET /   {"status": "UP", ...}
    POST /setup           {project, schema, ...} -> {model_version}
    POST /predict         {tasks, project, label_config, params} -> {results: [{result, score, model_version}, ...]}
    POST /webhook         {action, ...} -> {status}, at once
    POST /train           {project, ...} -> {status}, at once: the project's annotations are read again

A request that cannot be answered gets `{"error": "<one line>"}` with a 4xx/5xx status, and the line goes to the log;
the server goes on.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from .backend import Backend, BackendError

logger = logging.getLogger("pipeline_diffews.label_studio")


def create_app(backend: Backend):
    """The FastAPI application serving `backend`."""
    app = FastAPI(title="DiffewS Label Studio ML backend", docs_url=None, redoc_url=None)

    def _error(status: int, message: str):
        logger.error("%s", message)
        return JSONResponse({"error": message}, status_code=status)

    def route(handler):
        """An endpoint that passes the JSON object of the request to `handler` and answers what it returns."""

        async def endpoint(request: Request):
            path = request.url.path
            try:
                payload = await request.json()
            except ValueError:
                return _error(400, f"{path}: the body is not JSON")
            if not isinstance(payload, dict):
                return _error(400, f"{path}: the body is not a JSON object")
            try:
                return JSONResponse(await run_in_threadpool(handler, payload))
            except BackendError as error:
                return _error(error.status, str(error))
            except Exception as error:  # noqa: BLE001 - a bug: one reply, the traceback in the log, the server goes on
                logger.exception("%s failed", path)
                return _error(500, f"{path} failed: {type(error).__name__}: {error}")

        return endpoint

    @app.get("/")
    @app.get("/health")
    def health():
        return backend.health()

    for path, handler in [("/setup", backend.setup), ("/predict", backend.predict), ("/webhook", backend.webhook),
                          ("/train", backend.train)]:
        app.add_api_route(path, route(handler), methods=["POST"])

    return app
