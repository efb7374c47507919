"""DiffewS: diffusion-based few-shot segmentation as a diffusers pipeline."""

from .pipeline_diffews import DiffewSImageProcessor, DiffewSPipeline, DiffewSPipelineOutput, DiffewSSupport
from .unet_diffews import DiffewSAttnProcessor, DiffewSUNet2DConditionModel, SupportKeyValues

__all__ = [
    "DiffewSAttnProcessor",
    "DiffewSImageProcessor",
    "DiffewSPipeline",
    "DiffewSPipelineOutput",
    "DiffewSSupport",
    "DiffewSUNet2DConditionModel",
    "SupportKeyValues",
]
