"""DiffewS: diffusion-based few-shot segmentation as a diffusers pipeline."""

# diffusers' loader resolves a component library's base classes by name (as it finds `PreTrainedModel` in
# transformers); exporting ModelMixin lets `DiffewSPipeline.from_pretrained` load the UNet from this package.
from diffusers import ModelMixin  # noqa: F401

from .official import load_pipeline, resolve_model
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
    "load_pipeline",
    "resolve_model",
]
