"""The demo with any design: a model that cannot cache a support (`qkv_fusion`) segments and grows its example set
from the shots themselves; the support-token sampling checkbox reaches the pipeline."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

import app
import demo_utils
from pipeline_diffews.design_diffews import DiffewSDesign
from tests.test_app_labelling import added, corrected, example_inputs, page_segment, segmented
from tests.test_app_multiclass import files, url  # noqa: F401 (fixtures: a served tiny pipeline, its files)
from tests.tiny_models import tiny_design_pipeline


def test_the_page_runs_a_design_whose_support_side_depends_on_the_query(url, files, monkeypatch):  # noqa: F811
    monkeypatch.setattr(app, "_PIPE", tiny_design_pipeline(DiffewSDesign(interaction="qkv_fusion")))
    session = segmented(files)
    assert isinstance(session.examples.support, demo_utils.UncachedSupport)
    session, value, _, _ = app.correct_result(session, 1)
    out = added(session, corrected(value, (slice(0, 10), slice(0, 20)), (slice(0, 0), slice(0, 0)), "#ff00ff"))
    grown = out["session"]
    assert grown.examples.support.num_shots == 2 and grown.confirmed == [False, True]
    # the page's result for image a is the pipeline's own with the same two shots
    query = PIL.Image.open(files["query_a"]).convert("RGB")
    expected = app._PIPE(query, support_images=grown.examples.images, support_masks=grown.examples.masks)
    np.testing.assert_array_equal(grown.result.labels(0) > 0, expected.masks[0])


def test_the_token_sampling_checkbox_reaches_the_pipeline(url, files):  # noqa: F811
    inputs = example_inputs(files)
    session, value, _, _ = app.correct_result(segmented(files), 1)
    two_shots = added(session, corrected(value, (slice(0, 10), slice(0, 20)), (slice(0, 0), slice(0, 0)), "#ff00ff"))
    examples = two_shots["session"].examples
    sampled = app.set_token_sampling(None, True)
    assert sampled.support_token_sampling
    sampled.examples = examples
    sampled, *_ = page_segment(sampled, inputs)
    query = PIL.Image.open(files["query_a"]).convert("RGB")
    expected = app._PIPE(query, support=examples.support, support_token_sampling=True,
                         generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(sampled.result.probabilities[0], expected.probabilities[0], atol=1e-6)
    plain = app._PIPE(query, support=examples.support).probabilities[0]
    assert np.abs(sampled.result.probabilities[0] - plain).max() > 1e-6
