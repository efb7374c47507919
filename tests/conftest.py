import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes them many times slower
# (subprocesses inherit this too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from tests.tiny_models import save_tiny_pipeline, tiny_pipeline, write_sd_base  # noqa: E402


@pytest.fixture
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="session")
def sd_base(tmp_path_factory):
    return write_sd_base(tmp_path_factory.mktemp("sd_base"))


@pytest.fixture(scope="session")
def saved_pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))
