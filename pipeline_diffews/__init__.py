"""DiffewS: diffusion-based few-shot segmentation as a diffusers pipeline."""

# diffusers' loader resolves a component library's base classes by name (as it finds `PreTrainedModel` in
# transformers); exporting ModelMixin lets `DiffewSPipeline.from_pretrained` load the UNet from this package.
from diffusers import ModelMixin  # noqa: F401

from .image_processor_diffews import DiffewSImageProcessor, SupportSet, load_mask, read_support_set
from .pipeline_diffews import DiffewSPipeline, DiffewSPipelineOutput, DiffewSSupport
from .unet_diffews import DiffewSAttnProcessor, DiffewSUNet2DConditionModel, SupportKeyValues

__all__ = [
    "DiffewSAttnProcessor",
    "DiffewSImageProcessor",
    "DiffewSPipeline",
    "DiffewSPipelineOutput",
    "DiffewSSupport",
    "DiffewSUNet2DConditionModel",
    "ModelNotFoundError",
    "SupportKeyValues",
    "SupportSet",
    "load_mask",
    "load_pipeline",
    "read_support_set",
    "resolve_model",
]


def __getattr__(name: str):
    """`load_pipeline`, `resolve_model` and `ModelNotFoundError` come from `official`, imported on first use so that
    `python -m pipeline_diffews.<module>` does not import its module twice."""
    if name in ("load_pipeline", "resolve_model", "ModelNotFoundError"):
        from . import official

        return getattr(official, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
