"""SeMask (Semantically Masked Transformers for Semantic Segmentation) for Hugging Face Transformers.

Importing the package registers its classes with the Auto classes; saved folders also carry the code
(`auto_map`) so they load with `trust_remote_code=True` where semask is not installed.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForInstanceSegmentation,
    AutoModelForSemanticSegmentation,
    AutoModelForUniversalSegmentation,
)

from .configuration_semask import SemaskConfig
from .configuration_semask_mask2former import SemaskMask2FormerConfig
from .configuration_semask_maskformer import SemaskMaskFormerConfig
from .configuration_semask_mit import SemaskMitConfig
from .image_processing_semask import SemaskImageProcessor
from .modeling_semask import (
    SemaskBackbone,
    SemaskForSemanticSegmentation,
    SemaskModel,
    SemaskPreTrainedModel,
)
from .modeling_semask_mask2former import (
    SemaskMask2FormerForUniversalSegmentation,
    SemaskMask2FormerModel,
    SemaskMask2FormerPreTrainedModel,
)
from .modeling_semask_maskformer import (
    SemaskMaskFormerForInstanceSegmentation,
    SemaskMaskFormerModel,
    SemaskMaskFormerPreTrainedModel,
)
from .modeling_semask_mit import SemaskMitForSemanticSegmentation, SemaskMitModel, SemaskMitPreTrainedModel

# config class -> {model class: the Auto classes that load it (the first one is saved with the model's code)}
AUTO_CLASSES = {
    SemaskConfig: {
        SemaskModel: [AutoModel],
        SemaskForSemanticSegmentation: [AutoModelForSemanticSegmentation],
        SemaskBackbone: [AutoBackbone],
    },
    SemaskMask2FormerConfig: {
        SemaskMask2FormerModel: [AutoModel],
        # AutoModelForSemanticSegmentation: pipeline("image-segmentation") loads models through it
        SemaskMask2FormerForUniversalSegmentation: [
            AutoModelForUniversalSegmentation,
            AutoModelForSemanticSegmentation,
        ],
    },
    SemaskMaskFormerConfig: {
        SemaskMaskFormerModel: [AutoModel],
        SemaskMaskFormerForInstanceSegmentation: [AutoModelForInstanceSegmentation, AutoModelForSemanticSegmentation],
    },
    SemaskMitConfig: {
        SemaskMitModel: [AutoModel],
        SemaskMitForSemanticSegmentation: [AutoModelForSemanticSegmentation],
    },
}

for config_class, model_classes in AUTO_CLASSES.items():
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    for model_class, auto_classes in model_classes.items():
        for auto_class in auto_classes:
            auto_class.register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_classes[0].__name__)
    AutoImageProcessor.register(config_class, image_processor_classes={"pil": SemaskImageProcessor}, exist_ok=True)
SemaskImageProcessor.register_for_auto_class()

__all__ = [
    "SemaskBackbone",
    "SemaskConfig",
    "SemaskForSemanticSegmentation",
    "SemaskImageProcessor",
    "SemaskMask2FormerConfig",
    "SemaskMask2FormerForUniversalSegmentation",
    "SemaskMask2FormerModel",
    "SemaskMask2FormerPreTrainedModel",
    "SemaskMaskFormerConfig",
    "SemaskMaskFormerForInstanceSegmentation",
    "SemaskMaskFormerModel",
    "SemaskMaskFormerPreTrainedModel",
    "SemaskMitConfig",
    "SemaskMitForSemanticSegmentation",
    "SemaskMitModel",
    "SemaskMitPreTrainedModel",
    "SemaskModel",
    "SemaskPreTrainedModel",
]
