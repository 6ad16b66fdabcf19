"""SeMask (Semantically Masked Transformers for Semantic Segmentation) for Hugging Face Transformers.

Importing the package registers its classes with the Auto classes; saved folders also carry the code
(`auto_map`) so they load with `trust_remote_code=True` where semask is not installed.
"""

from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation

from .configuration_semask import SemaskConfig
from .image_processing_semask import SemaskImageProcessor
from .modeling_semask import (
    SemaskBackbone,
    SemaskForSemanticSegmentation,
    SemaskModel,
    SemaskPreTrainedModel,
)

AUTO_CLASSES = {
    SemaskModel: AutoModel,
    SemaskForSemanticSegmentation: AutoModelForSemanticSegmentation,
    SemaskBackbone: AutoBackbone,
}

AutoConfig.register(SemaskConfig.model_type, SemaskConfig, exist_ok=True)
SemaskConfig.register_for_auto_class()
for model_class, auto_class in AUTO_CLASSES.items():
    auto_class.register(SemaskConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class.__name__)
AutoImageProcessor.register(SemaskConfig, image_processor_classes={"pil": SemaskImageProcessor}, exist_ok=True)
SemaskImageProcessor.register_for_auto_class()

__all__ = [
    "SemaskBackbone",
    "SemaskConfig",
    "SemaskForSemanticSegmentation",
    "SemaskImageProcessor",
    "SemaskModel",
    "SemaskPreTrainedModel",
]
