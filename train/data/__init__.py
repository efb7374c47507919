"""Few-shot segmentation data: benchmark sources, fold splits and episodes.

Typical use::

    from train.data import build_source, EvaluationEpisodes, TrainingEpisodes

    test = build_source("coco20i", "/data/COCO2014", "val", fold=0, mode="test")
    episodes = EvaluationEpisodes(test, shots=1)          # HSNet: 1000 episodes, seed 0
    train = build_source("coco20i", "/data/COCO2014", "train", fold=0, mode="train")
    batches = TrainingEpisodes(train, max_shots=5, batch_size=4, num_steps=10_000)
"""

from .base import IGNORE, FewShotSource, IndexedSource
from .episodes import (
    Episode,
    EpisodeSpec,
    EvaluationEpisodes,
    MulticlassEpisode,
    MulticlassEpisodes,
    collate_episodes,
    draw_evaluation_specs,
    load_episode,
)
from .incontext import ConcatSource
from .protocol import EpisodePlan, fold_class_ids
from .registry import SOURCES, build_source
from .training_episodes import StepBatchSampler, TrainingEpisodes, draw_training_spec, sample_training_episode

__all__ = [
    "IGNORE", "FewShotSource", "IndexedSource", "Episode", "EpisodeSpec", "EvaluationEpisodes",
    "MulticlassEpisode", "MulticlassEpisodes",
    "StepBatchSampler", "TrainingEpisodes", "collate_episodes", "draw_evaluation_specs",
    "draw_training_spec", "fold_class_ids", "load_episode", "sample_training_episode",
    "ConcatSource", "EpisodePlan", "SOURCES", "build_source",
]
