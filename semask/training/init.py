"""Model initialisation for training: a checkpoint of the model's kind, a Swin or SegFormer checkpoint, a preset or
"tiny"."""

import logging
from dataclasses import dataclass, field

from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from ..configuration_semask import SemaskConfig
from ..configuration_semask_mask2former import SemaskMask2FormerConfig
from ..configuration_semask_maskformer import SemaskMaskFormerConfig
from ..configuration_semask_mit import SemaskMitConfig
from ..modelcard import encoder_config
from ..modeling_semask import SemaskForSemanticSegmentation, load_swin, summarize_keys, swin_encoder_settings
from ..modeling_semask_mask2former import SemaskMask2FormerForUniversalSegmentation
from ..modeling_semask_maskformer import SemaskMaskFormerForInstanceSegmentation
from ..modeling_semask_mit import SemaskMitForSemanticSegmentation
from .arguments import MODEL_NAMES, ModelArguments

logger = logging.getLogger(__name__)

TINY_CONFIG = {
    "embed_dim": 32,
    "depths": (2, 2, 2, 2),
    "num_heads": (1, 2, 4, 8),
    "window_size": 4,
    "semantic_window_size": 4,
    "mlp_ratio": 2.0,
    "decoder_hidden_size": 32,
    "drop_path_rate": 0.1,
}
"""A SeMask small enough to train on a CPU in minutes (`--preset tiny`)."""

TINY_MASK2FORMER_CONFIG = {
    "backbone_config": {key: value for key, value in TINY_CONFIG.items() if key != "decoder_hidden_size"},
    "feature_size": 32,
    "mask_feature_size": 32,
    "hidden_dim": 32,
    "num_attention_heads": 4,
    "encoder_layers": 1,
    "encoder_feedforward_dim": 64,
    "decoder_layers": 3,
    "dim_feedforward": 64,
    "num_queries": 16,
    "train_num_points": 256,
}
"""A SeMask-Mask2Former with the encoder of `TINY_CONFIG` (`--preset tiny --model_type semask_mask2former`)."""

TINY_MASKFORMER_CONFIG = {
    "backbone_config": TINY_MASK2FORMER_CONFIG["backbone_config"],
    "fpn_feature_size": 32,
    "mask_feature_size": 32,
    "decoder_config": {
        "d_model": 32,
        "num_queries": 16,
        "decoder_layers": 3,
        "decoder_attention_heads": 4,
        "decoder_ffn_dim": 64,
    },
}
"""A SeMask-MaskFormer with the encoder of `TINY_CONFIG` (`--preset tiny --model_type semask_maskformer`)."""

TINY_MIT_CONFIG = {
    "hidden_sizes": (32, 64, 128, 256),
    "depths": (2, 2, 2, 2),
    "num_attention_heads": (1, 2, 4, 8),
    "semantic_window_size": 4,
    "decoder_hidden_size": 64,
    "drop_path_rate": 0.1,
}
"""A SeMask-MiT (MiT-B0's depths, heads and sequence reduction, narrower) for the CPU demo (`--preset tiny
--model_type semask_mit`)."""

MODEL_CLASSES = {
    SemaskConfig.model_type: SemaskForSemanticSegmentation,
    SemaskMask2FormerConfig.model_type: SemaskMask2FormerForUniversalSegmentation,
    SemaskMaskFormerConfig.model_type: SemaskMaskFormerForInstanceSegmentation,
    SemaskMitConfig.model_type: SemaskMitForSemanticSegmentation,
}
TINY_CONFIGS = {
    SemaskConfig.model_type: TINY_CONFIG,
    SemaskMask2FormerConfig.model_type: TINY_MASK2FORMER_CONFIG,
    SemaskMaskFormerConfig.model_type: TINY_MASKFORMER_CONFIG,
    SemaskMitConfig.model_type: TINY_MIT_CONFIG,
}

# Where SeMask-Mask2Former and SeMask-MaskFormer keep their SeMask-Swin encoder.
MASK_CLASSIFICATION_ENCODER = "model.pixel_level_module.encoder"


@dataclass
class InitialisationReport:
    """What `initialise_model` loaded and what it initialised afresh.

    Args:
        source (`str`):
            Where the weights come from, as a phrase (e.g. "the Swin checkpoint microsoft/swin-tiny-...").
        reinitialised (`list[str]`, *optional*):
            The model's weights that were initialised afresh, sorted.
        unused (`list[str]`, *optional*):
            The checkpoint's weights that the model does not use, sorted.
    """

    source: str
    reinitialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"Initialised from {self.source}."]
        if self.reinitialised:
            lines.append(f"Newly initialised ({len(self.reinitialised)}): {summarize_keys(self.reinitialised)}")
        if self.unused:
            lines.append(f"Checkpoint weights not used ({len(self.unused)}): {summarize_keys(self.unused)}")
        return "\n".join(lines)


def resolve_model_type(args: ModelArguments) -> str:
    """The kind of model to train, "semask" (SeMask-FPN), "semask_mask2former", "semask_maskformer" or "semask_mit":
    `--model_type`, which must agree with the preset's or checkpoint's kind (a SegFormer checkpoint implies
    SeMask-MiT); for "tiny", Swin checkpoints and no model it defaults to SeMask-FPN."""
    implied, source, checkpoint_type = None, None, None
    if args.preset:
        kinds = [
            kind for kind, model_class in MODEL_CLASSES.items() if args.preset in model_class.config_class.preset_names
        ]
        implied = kinds[0] if kinds else None
        if not kinds and args.preset != "tiny":
            names = ", ".join(
                (
                    "tiny",
                    *(name for model_class in MODEL_CLASSES.values() for name in model_class.config_class.preset_names),
                )
            )
            raise ValueError(f"Unknown preset {args.preset!r}; expected one of: {names}.")
        source = f"the preset {args.preset!r}"
    elif args.model_name_or_path:
        checkpoint_type = AutoConfig.from_pretrained(args.model_name_or_path).model_type
        if checkpoint_type not in (*MODEL_CLASSES, "swin", "segformer"):
            raise ValueError(
                f"{args.model_name_or_path} is a {checkpoint_type!r} checkpoint; expected a "
                f"{', '.join(MODEL_NAMES.values())}, Swin or SegFormer one."
            )
        implied = {"segformer": SemaskMitConfig.model_type}.get(checkpoint_type, checkpoint_type)
        implied = implied if implied in MODEL_CLASSES else None
        source = f"the checkpoint {args.model_name_or_path}"
    if args.model_type and implied and args.model_type != implied:
        raise ValueError(f"--model_type {args.model_type} contradicts {source}, which is a {implied!r} model.")
    model_type = args.model_type or implied or SemaskConfig.model_type
    if checkpoint_type == "swin" and model_type == SemaskMitConfig.model_type:
        raise ValueError(
            f"{MODEL_NAMES[model_type]} has a Mix Transformer encoder: start it from a SegFormer / MiT checkpoint, "
            f"not the Swin checkpoint {args.model_name_or_path}."
        )
    return model_type


def initialise_model(args: ModelArguments, id2label: dict[int, str]) -> tuple[PreTrainedModel, InitialisationReport]:
    """A SeMask-FPN, SeMask-Mask2Former, SeMask-MaskFormer or SeMask-MiT model (`resolve_model_type`) for the label
    set `id2label`, from a checkpoint of that kind, a Swin (SeMask-MiT: SegFormer) checkpoint, a preset or "tiny"."""
    if args.model_name_or_path and args.preset:
        raise ValueError("Pass either --model_name_or_path or --preset, not both.")
    if not args.preset and not args.model_name_or_path:
        raise ValueError(
            "No model given: pass --model_name_or_path (a SeMask, Swin or SegFormer checkpoint) or --preset."
        )
    model_type = resolve_model_type(args)
    labels = {"id2label": dict(id2label), "label2id": {name: index for index, name in id2label.items()}}
    if args.pixel_decoder is not None and model_type != SemaskMask2FormerConfig.model_type:
        raise ValueError("--pixel_decoder applies to SeMask-Mask2Former (--model_type semask_mask2former) only.")
    decoder = {} if args.pixel_decoder is None else {"pixel_decoder": args.pixel_decoder}
    if args.preset:
        config = preset_config(args.preset, model_type, labels, **decoder)
        set_drop_path_rate(config, args.drop_path_rate)
        return MODEL_CLASSES[model_type](config), InitialisationReport(
            f"random weights in the {args.preset!r} architecture"
        )
    checkpoint_config = AutoConfig.from_pretrained(args.model_name_or_path)
    if checkpoint_config.model_type == "swin":
        return _model_from_swin(args.model_name_or_path, model_type, labels, args.drop_path_rate, decoder)
    if checkpoint_config.model_type == "segformer":
        return _model_from_segformer(args.model_name_or_path, labels, args.drop_path_rate)
    if decoder and decoder["pixel_decoder"] != checkpoint_config.pixel_decoder:
        raise ValueError(
            f"--pixel_decoder {args.pixel_decoder} contradicts the checkpoint {args.model_name_or_path}, whose pixel "
            f"decoder is {checkpoint_config.pixel_decoder!r}."
        )
    return _model_from_checkpoint(args.model_name_or_path, model_type, labels, args.drop_path_rate)


def preset_config(preset: str, model_type: str, labels: dict[str, dict], **overrides) -> PreTrainedConfig:
    """The config of `preset` (or of the tiny demo model) for `labels`; the config applies the original
    semantic-attention rule to this label set. A released preset's `pixel_decoder` cannot be overridden."""
    config_class = MODEL_CLASSES[model_type].config_class
    if preset == "tiny":
        return config_class(**TINY_CONFIGS[model_type], **labels, **overrides)
    config = config_class.from_preset(preset, **labels)
    if "pixel_decoder" in overrides and overrides["pixel_decoder"] != config.pixel_decoder:
        raise ValueError(
            f"--pixel_decoder {overrides['pixel_decoder']} contradicts the preset {preset}, whose pixel decoder is "
            f"{config.pixel_decoder!r}."
        )
    return config


def set_drop_path_rate(config: PreTrainedConfig, drop_path_rate: float | None) -> None:
    """Set the encoder's stochastic depth rate, unless `drop_path_rate` is None."""
    if drop_path_rate is not None:
        encoder_config(config).drop_path_rate = drop_path_rate


def _model_from_swin(
    path: str, model_type: str, labels: dict[str, dict], drop_path_rate: float | None, decoder: dict[str, str]
) -> tuple[PreTrainedModel, InitialisationReport]:
    overrides = {"drop_path_rate": drop_path_rate} if drop_path_rate is not None else {}
    source = f"the Swin checkpoint {path}"
    if model_type == SemaskConfig.model_type:
        model, info = SemaskForSemanticSegmentation.from_swin_pretrained(
            path, output_loading_info=True, **labels, **overrides
        )
        return model, InitialisationReport(source, sorted(info["missing_keys"]), sorted(info["unexpected_keys"]))
    swin = load_swin(path)
    # Encoder settings without `semantic_attention`: the config applies the original rule of its kind.
    model_class = MODEL_CLASSES[model_type]
    config = model_class.config_class(
        backbone_config=swin_encoder_settings(swin.config, **overrides), **labels, **decoder
    )
    model = model_class(config)
    info = model.get_submodule(MASK_CLASSIFICATION_ENCODER).load_swin_weights(swin, path)
    fresh = [name for name in model.state_dict() if not name.startswith(f"{MASK_CLASSIFICATION_ENCODER}.")]
    fresh += [f"{MASK_CLASSIFICATION_ENCODER}.{name}" for name in info["missing_keys"]]
    return model, InitialisationReport(source, sorted(fresh), sorted(info["unexpected_keys"]))


def _model_from_segformer(
    path: str, labels: dict[str, dict], drop_path_rate: float | None
) -> tuple[PreTrainedModel, InitialisationReport]:
    overrides = {"drop_path_rate": drop_path_rate} if drop_path_rate is not None else {}
    model, info = SemaskMitForSemanticSegmentation.from_segformer_pretrained(
        path, output_loading_info=True, **labels, **overrides
    )
    report = InitialisationReport(
        f"the SegFormer checkpoint {path}", sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    )
    return model, report


def _model_from_checkpoint(
    path: str, model_type: str, labels: dict[str, dict], drop_path_rate: float | None
) -> tuple[PreTrainedModel, InitialisationReport]:
    config = AutoConfig.from_pretrained(path)
    previous_labels = config.id2label
    config.id2label, config.label2id = labels["id2label"], labels["label2id"]
    set_drop_path_rate(config, drop_path_rate)
    model, info = MODEL_CLASSES[model_type].from_pretrained(
        path, config=config, ignore_mismatched_sizes=True, output_loading_info=True
    )
    mismatched = sorted(key for key, *_ in info["mismatched_keys"])
    report = InitialisationReport(
        f"the {MODEL_NAMES[model_type]} checkpoint {path}",
        sorted(set(info["missing_keys"]) | set(mismatched)),
        sorted(info["unexpected_keys"]),
    )
    if mismatched:
        logger.warning(
            "The label set changed (%d -> %d classes): re-initialised the class projections of the semantic layers "
            "and the classifier: %s",
            len(previous_labels),
            len(labels["id2label"]),
            summarize_keys(mismatched),
        )
    elif previous_labels != labels["id2label"]:
        logger.warning(
            "The label names differ from the checkpoint's but their number (%d) does not: the class weights are kept.",
            len(previous_labels),
        )
    return model, report
