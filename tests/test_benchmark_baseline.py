"""The benchmarks' "authors' way" (`benchmarks.speed`) computes what the pipeline computes, so that its speed ratios
compare equal work."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.speed import AuthorsWay
from pipeline_diffews import DiffewSPipeline
from tests.tiny_models import RESOLUTION, random_box_mask, random_image, tiny_unet, tiny_vae


@pytest.mark.parametrize("shots", [1, 3])
def test_authors_way_matches_the_pipeline(shots):
    unet, vae = tiny_unet(0).eval(), tiny_vae(1).eval()
    rng = np.random.default_rng(shots)
    supports = [random_image(rng, 80, 96) for _ in range(shots)]
    masks = [random_box_mask(rng, 80, 96) for _ in range(shots)]
    query = random_image(rng, 72, 100)

    prediction = AuthorsWay(unet, vae, RESOLUTION).predict(query, supports, masks)  # [3, R, R]
    pipe = DiffewSPipeline(unet=unet, vae=vae, processing_resolution=RESOLUTION, cpu_bfloat16=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(query, support_images=supports, support_masks=masks, match_input_resolution=False)

    reference = prediction.mean(0).numpy()
    assert np.abs(out.probabilities[0] - reference).max() < 1e-5
    assert (out.masks[0] == (reference > 0.25 * prediction.max().item())).mean() >= 0.999
    # At the query's size the authors' way upsamples its mask by nearest neighbours
    assert AuthorsWay(unet, vae, RESOLUTION)(query, supports, masks).shape == (query.height, query.width)
