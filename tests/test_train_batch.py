"""Episodes -> tensors -> loss: every query keeps its own supports, and the loss can be driven down."""

from __future__ import annotations

import pytest
import torch

from pipeline_diffews import DiffewSImageProcessor
from tests.fixtures_data import CAMVID, needs_camvid
from tests.tiny_models import RESOLUTION, tiny_pipeline
from tests.training_runs import TRAIN_RESOLUTION
from tests.training_runs import single_thread  # noqa: F401  (autouse fixtures)
from train.data import TrainingEpisodes, build_source
from train.episode_batch import EpisodeCollator, diffews_loss, encode_episodes, episodes_to_pixels

pytestmark = needs_camvid


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    """Four real CamVid training episodes (fold 0) with 2 shots each, all different."""
    source = build_source("camvid", CAMVID, "train", 0, "train", index_cache=tmp_path_factory.mktemp("index"))
    stream = TrainingEpisodes(source, max_shots=2, batch_size=4, seed=3, num_steps=8)
    step = next(s for s in range(8) if stream.shots_at(s) == 2)
    batch = stream.batch(step)
    assert len({tuple(e.support_keys) for e in batch}) == 4
    return batch


def test_pixels_keep_each_episode_with_its_own_supports(episodes):
    pixels = EpisodeCollator(RESOLUTION)(episodes[:2])
    r = RESOLUTION
    assert pixels.query.shape == (2, 3, r, r) and pixels.query_mask.shape == (2, 3, r, r)
    assert pixels.support.shape == (2, 2, 3, r, r) and pixels.support_mask.shape == (2, 2, 3, r, r)
    for b, episode in enumerate(episodes[:2]):
        assert torch.equal(pixels.query[b], DiffewSImageProcessor.image_to_tensor(episode.query_image, r))
        for n, (image, mask) in enumerate(zip(episode.support_images, episode.support_masks)):
            assert torch.equal(pixels.support[b, n], DiffewSImageProcessor.image_to_tensor(image, r))
            assert torch.equal(pixels.support_mask[b, n], DiffewSImageProcessor.mask_to_tensor(mask == 1, r))
    assert set(pixels.query_mask.unique().tolist()) <= {-1.0, 1.0}  # ignore (255) counts as background
    assert pixels.query.min() >= -1 and pixels.query.max() <= 1


def test_batch_of_two_pairs_each_query_with_its_own_supports(episodes):
    """Catches the released code's bug (every query of a batch used the first episode's supports)."""
    pipe = tiny_pipeline()
    pixels = episodes_to_pixels(episodes[:2], TRAIN_RESOLUTION)
    latents = encode_episodes(pipe.vae, pixels)
    with torch.no_grad():
        together = pipe.unet(latents.query, 1, support_sample=latents.support).sample
        alone = [pipe.unet(latents.query[b : b + 1], 1, support_sample=latents.support[b : b + 1]).sample
                 for b in range(2)]
        first_supports = pipe.unet(latents.query[1:2], 1, support_sample=latents.support[0:1]).sample
    torch.testing.assert_close(together[0:1], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together[1:2], alone[1], atol=1e-5, rtol=1e-4)
    assert (together[1:2] - first_supports).abs().max() > 100 * (together[1:2] - alone[1]).abs().max()

    with torch.no_grad():
        batch_loss = diffews_loss(pipe.unet, latents)
        single = [diffews_loss(pipe.unet, type(latents)(latents.query[b:b + 1], latents.target[b:b + 1],
                                                         latents.support[b:b + 1])) for b in range(2)]
    torch.testing.assert_close(batch_loss, (single[0] + single[1]) / 2, atol=1e-6, rtol=1e-4)


def test_latents_and_target(episodes):
    pipe = tiny_pipeline()
    pixels = episodes_to_pixels(episodes[:1], RESOLUTION)
    latents = encode_episodes(pipe.vae, pixels)
    h = RESOLUTION // pipe.vae_scale_factor
    assert latents.query.shape == (1, 4, h, h) and latents.target.shape == (1, 4, h, h)
    assert latents.support.shape == (1, 2, 8, h, h)
    # Same encoding as the pipeline's (posterior mean x scaling factor), mask latent on channels 4..7.
    torch.testing.assert_close(latents.target, pipe._encode_latents(pixels.query_mask))
    torch.testing.assert_close(latents.support[0, :, 4:], pipe._encode_latents(pixels.support_mask[0]))
    torch.manual_seed(0)
    sampled = encode_episodes(pipe.vae, pixels, sample=True)
    assert not torch.equal(sampled.query, latents.query)


def test_mixed_shots_and_empty_batches_are_rejected(episodes):
    one_shot = type(episodes[0])(**{**episodes[0].__dict__, "support_images": episodes[0].support_images[:1],
                                    "support_masks": episodes[0].support_masks[:1]})
    with pytest.raises(ValueError, match="same number of shots"):
        episodes_to_pixels([episodes[0], one_shot], RESOLUTION)
    with pytest.raises(ValueError, match="empty"):
        episodes_to_pixels([], RESOLUTION)


def test_a_few_steps_overfit_a_fixed_episode(episodes):
    pipe = tiny_pipeline()
    unet = pipe.unet.train()
    latents = encode_episodes(pipe.vae, episodes_to_pixels(episodes[:1], RESOLUTION))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-4, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    losses = []
    for _ in range(10):
        loss = diffews_loss(unet, latents)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if losses[0] >= 5 * losses[-1]:
            break
    assert losses[0] >= 5 * losses[-1], losses
    assert unet.conv_in_ref.weight.grad is not None and unet.conv_in_ref.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients(episodes):
    pipe = tiny_pipeline()
    latents = encode_episodes(pipe.vae, episodes_to_pixels(episodes[:1], TRAIN_RESOLUTION))
    unet = pipe.unet.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.zero_grad(set_to_none=True)
        diffews_loss(unet, latents).backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4)
