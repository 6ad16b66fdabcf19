"""Model cards (README.md) for semask model folders, built on `huggingface_hub.ModelCard` (works offline).

The card describes the architecture (read from the config), the label set, the evaluation protocol (read from the
image processor saved in the folder, or the dataset's original test pipeline), the original paper's numbers for
converted checkpoints, the user's evaluation results, usage snippets, the licenses and the citation.
"""

import math
import numbers
from pathlib import Path
from typing import NamedTuple

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import PreTrainedConfig

from .configuration_semask import SemaskConfig, settings_equal
from .configuration_semask_mask2former import SemaskMask2FormerConfig
from .configuration_semask_maskformer import SemaskMaskFormerConfig
from .configuration_semask_mit import SemaskMitConfig
from .image_processing_semask import SemaskImageProcessor
from .inference import MS_FLIP_SCALES
from .modeling_semask import SemaskForSemanticSegmentation
from .modeling_semask_mask2former import SemaskMask2FormerForUniversalSegmentation
from .modeling_semask_maskformer import SemaskMaskFormerForInstanceSegmentation
from .modeling_semask_mit import SemaskMitForSemanticSegmentation
from .presets import (
    MASK2FORMER_PRESET_NAMES,
    MASK2FORMER_PROCESSING,
    MASKFORMER_PRESET_NAMES,
    MIT_PRESET_NAMES,
    MIT_SIZES,
    PRESET_NAMES,
    SWIN_SIZES,
)

PAPER_URL = "https://arxiv.org/abs/2112.12782"
ORIGINAL_REPO_URL = "https://github.com/Picsart-AI-Research/SeMask-Segmentation"
ORIGINAL_SOURCE_NAME = "Original SeMask README (reported, not re-measured)"
CODE_LICENSE = "mit"
ORIGINAL_WEIGHTS_LICENSE = "apache-2.0"
CITATION = """@inproceedings{jain2023semask,
  title={SeMask: Semantically Masked Transformers for Semantic Segmentation},
  author={Jitesh Jain and Anukriti Singh and Nikita Orlov and Zilong Huang and Jiachen Li and Steven Walton and
          Humphrey Shi},
  year={2023},
  booktitle={ICCV Workshops 2023},
}"""
# Label lists longer than this are folded into a collapsible block.
LONG_LABEL_LIST = 20
# Trainer metrics (without the `eval_` prefix) that also go into the `model-index` metadata.
MODEL_INDEX_METRICS = {"mean_iou": "Mean IoU", "mean_accuracy": "Mean accuracy", "overall_accuracy": "Overall accuracy"}


class DatasetInfo(NamedTuple):
    title: str
    hub_id: str | None  # the Hub id of the `datasets` metadata and the model-index (None: the name is not one)
    split: str | None  # the split the original numbers were measured on


class ReportedResult(NamedTuple):
    crop_size: str
    mean_iou: float  # single-scale, in %
    ms_flip_mean_iou: float  # multi-scale + flip, in %
    params: str  # as the original README writes it


DATASETS = {
    "ade20k": DatasetInfo("ADE20K", "scene_parse_150", "validation"),
    "cityscapes": DatasetInfo("Cityscapes", "cityscapes", "validation"),
    "coco-stuff10k": DatasetInfo("COCO-Stuff-10k", "coco-stuff10k", "test"),
}

# SeMask-FPN rows of the original README (Picsart-AI-Research/SeMask-Segmentation, commit 16539be).
ORIGINAL_RESULTS = {
    "semask-tiny-fpn-ade20k": ReportedResult("512x512", 42.06, 43.36, "35M"),
    "semask-small-fpn-ade20k": ReportedResult("512x512", 45.92, 47.63, "56M"),
    "semask-base-fpn-ade20k": ReportedResult("512x512", 49.35, 50.98, "96M"),
    "semask-large-fpn-ade20k": ReportedResult("640x640", 51.89, 53.52, "211M"),
    "semask-tiny-fpn-cityscapes": ReportedResult("768x768", 74.92, 76.56, "34M"),
    "semask-small-fpn-cityscapes": ReportedResult("768x768", 77.13, 79.14, "56M"),
    "semask-base-fpn-cityscapes": ReportedResult("768x768", 77.70, 79.73, "96M"),
    "semask-large-fpn-cityscapes": ReportedResult("768x768", 78.53, 80.39, "211M"),
    "semask-tiny-fpn-coco-stuff10k": ReportedResult("512x512", 37.53, 38.88, "35M"),
    "semask-small-fpn-coco-stuff10k": ReportedResult("512x512", 40.72, 42.27, "56M"),
    "semask-base-fpn-coco-stuff10k": ReportedResult("512x512", 44.63, 46.30, "96M"),
    "semask-large-fpn-coco-stuff10k": ReportedResult("640x640", 47.47, 48.54, "211M"),
    # SeMask-Mask2Former rows of the SeMask-Mask2Former README (same commit)
    "semask-large-mask2former-ade20k": ReportedResult("640x640", 56.41, 57.52, "222M"),
    "semask-large-mask2former-cityscapes": ReportedResult("512x1024", 83.97, 84.98, "222M"),
    # SeMask-Mask2Former FaPN / MSFaPN rows of the SeMask-FAPN README (same commit): the paper's best models
    "semask-large-mask2former-fapn-ade20k": ReportedResult("640x640", 56.88, 58.25, "227M"),
    "semask-large-mask2former-msfapn-ade20k": ReportedResult("640x640", 57.00, 58.25, "224M"),
    # SeMask-MaskFormer row of the SeMask-MaskFormer README (same commit)
    "semask-large-maskformer-ade20k": ReportedResult("640x640", 54.75, 56.15, "219M"),
}
# model kind -> (its name, config class, model class, presets)
MODEL_KINDS = {
    "fpn": ("SeMask-FPN", SemaskConfig, SemaskForSemanticSegmentation, PRESET_NAMES),
    "mask2former": (
        "SeMask-Mask2Former",
        SemaskMask2FormerConfig,
        SemaskMask2FormerForUniversalSegmentation,
        MASK2FORMER_PRESET_NAMES,
    ),
    "maskformer": (
        "SeMask-MaskFormer",
        SemaskMaskFormerConfig,
        SemaskMaskFormerForInstanceSegmentation,
        MASKFORMER_PRESET_NAMES,
    ),
    "mit": ("SeMask-MiT", SemaskMitConfig, SemaskMitForSemanticSegmentation, MIT_PRESET_NAMES),
}
MASK_CLASSIFICATION_KINDS = ("mask2former", "maskformer")
# The preset settings a config must share to carry that preset's reported numbers (encoder, Mask2Former, MaskFormer
# and its decoder).
PRESET_ARCHITECTURE_KEYS = ("embed_dim", "depths", "num_heads", "window_size", "semantic_attention", "id2label")
MASK2FORMER_ARCHITECTURE_KEYS = (
    "pixel_decoder",
    "feature_size",
    "hidden_dim",
    "num_queries",
    "encoder_layers",
    "decoder_layers",
)
MASKFORMER_ARCHITECTURE_KEYS = ("fpn_feature_size", "mask_feature_size")
MASKFORMER_DECODER_ARCHITECTURE_KEYS = ("d_model", "num_queries", "decoder_layers")


def write_model_card(
    save_directory: str | Path,
    config: PreTrainedConfig,
    *,
    preset: str | None = None,
    eval_results: dict | None = None,
    dataset_name: str | None = None,
    base_model: str | None = None,
    training_summary: str | None = None,
    model_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `save_directory/README.md` describing the semask model of `config`; returns its path.

    Args:
        preset: the released model this folder was converted from (e.g. "semask-tiny-fpn-ade20k"); adds the
            original paper's numbers. The config must match the preset's architecture and labels.
        eval_results: Trainer-style metrics, e.g. `{"eval_mean_iou": 0.61, "eval_per_category_iou": [...]}`; the
            finite mIoU and accuracies also go into the `model-index` when the dataset has a Hub id.
        dataset_name: the dataset the model was trained or evaluated on: a Hub id (also in the `datasets` metadata,
            the tags and the model-index) or a descriptive name (only in the text).
        base_model: the checkpoint the model was fine-tuned from (Hub model id).
        training_summary: free text (Markdown) about the training run.
        model_id: the name used in the usage snippets (default: the folder's name).
        overwrite: replace an existing README.md (otherwise `FileExistsError`).
    """
    save_directory = Path(save_directory)
    path = save_directory / "README.md"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    dataset_key = preset_dataset(preset) if preset else None
    if preset and (different := preset_mismatches(config, preset)):
        raise ValueError(
            f"The config does not match preset {preset!r} (different {', '.join(different)}); the preset's reported "
            "numbers would not describe this model. Pass preset=None."
        )
    if base_model is not None and not _is_hub_id(base_model):
        raise ValueError(f"base_model must be a Hub model id (the card's metadata links to it), got {base_model!r}")
    model_id = model_id or save_directory.resolve().name
    processor = _saved_or_default_processor(save_directory, dataset_key, config)
    dataset_id = dataset_name if dataset_name and _is_hub_id(dataset_name) else None
    eval_dataset = DatasetInfo(dataset_name, dataset_id, None) if dataset_name else DATASETS.get(dataset_key)
    reported = _reported_eval_results(preset) if preset else []
    model_index = reported + _trainer_eval_results(eval_results or {}, eval_dataset)

    card_data = ModelCardData(
        model_name=model_id if model_index else None,  # the model-index's name (not a metadata field of its own)
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license=ORIGINAL_WEIGHTS_LICENSE if preset else CODE_LICENSE,
        tags=["semask", "semantic-segmentation", "custom_code", "vision"] + _dataset_tags(dataset_key, dataset_id),
        datasets=_metadata_datasets(dataset_key, dataset_id) or None,
        base_model=base_model,
        metrics=["mean_iou"],
        eval_results=model_index or None,  # no empty model-index
    )
    sections = [
        _introduction(model_id, config, preset, base_model),
        describe_architecture(config, count_parameters(config)),
        describe_labels(config.id2label),
        describe_evaluation_protocol(processor, config),
        _results_section(config, preset, eval_results),
        f"## Training\n\n{training_summary.strip()}" if training_summary else "",
        usage_snippets(model_id),
        _license_section(preset),
        f"## Citation\n\n```bibtex\n{CITATION}\n```",
    ]
    body = "\n\n".join(section for section in sections if section)
    save_directory.mkdir(parents=True, exist_ok=True)
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n").save(path)
    return path


def preset_dataset(preset: str) -> str:
    """The dataset key ("ade20k", "cityscapes", "coco-stuff10k") of a released model's preset name."""
    if preset not in ORIGINAL_RESULTS:
        names = ", ".join(ORIGINAL_RESULTS)
        raise ValueError(f"Unknown SeMask preset {preset!r}; expected one of: {names}.")
    return next(dataset for dataset in DATASETS if preset.endswith(f"-{dataset}"))


def model_kind(config: PreTrainedConfig) -> str:
    """The `MODEL_KINDS` key of the model `config` describes: "fpn", "mask2former", "maskformer" or "mit"; a
    ValueError for other configs."""
    for kind, (_, config_class, _, _) in reversed(MODEL_KINDS.items()):
        if isinstance(config, config_class):
            return kind
    names = ", ".join(name for name, *_ in MODEL_KINDS.values())
    raise ValueError(f"Model cards describe {names} models, not a {type(config).__name__}.")


def is_mask_classification(config: PreTrainedConfig) -> bool:
    """Whether `config` describes SeMask-Mask2Former or SeMask-MaskFormer (otherwise SeMask-FPN or SeMask-MiT)."""
    return model_kind(config) in MASK_CLASSIFICATION_KINDS


def encoder_config(config: PreTrainedConfig) -> SemaskConfig | SemaskMitConfig:
    """The encoder's settings: the config itself (SeMask-FPN, SeMask-MiT) or its `backbone_config`."""
    return config.backbone_config if is_mask_classification(config) else config


def preset_mismatches(config: PreTrainedConfig, preset: str) -> list[str]:
    """The architecture / label settings in which `config` differs from the released model `preset`."""
    preset_kind = next(kind for kind, (*_, presets) in MODEL_KINDS.items() if preset in presets)
    expected = MODEL_KINDS[preset_kind][1].from_preset(preset)
    if model_kind(config) != preset_kind:
        return [f"model kind ({architecture_name(config)}, not {architecture_name(expected)})"]
    encoder, expected_encoder = encoder_config(config), encoder_config(expected)
    different = [
        key
        for key in PRESET_ARCHITECTURE_KEYS
        if not settings_equal(getattr(encoder, key), getattr(expected_encoder, key))
    ]
    if preset_kind == "mask2former":
        different += [key for key in MASK2FORMER_ARCHITECTURE_KEYS if getattr(config, key) != getattr(expected, key)]
    if preset_kind == "maskformer":
        different += [key for key in MASKFORMER_ARCHITECTURE_KEYS if getattr(config, key) != getattr(expected, key)]
        different += [
            key
            for key in MASKFORMER_DECODER_ARCHITECTURE_KEYS
            if getattr(config.decoder_config, key) != getattr(expected.decoder_config, key)
        ]
    return different


def count_parameters(config: PreTrainedConfig) -> int:
    """Parameters of the semask model of `config`, counted on the meta device (no memory, no init)."""
    model_class = MODEL_KINDS[model_kind(config)][2]
    with torch.device("meta"):
        model = model_class(config)
    return sum(parameter.numel() for parameter in model.parameters())


def encoder_size_name(config: PreTrainedConfig) -> str:
    """The encoder's size: "Swin-T" ... "Swin-L", "MiT-B0" ... "MiT-B5", or "custom Swin" / "custom MiT"."""
    encoder = encoder_config(config)
    mit = model_kind(config) == "mit"
    for name, size in (MIT_SIZES if mit else SWIN_SIZES).items():
        encoder_keys = {key: value for key, value in size.items() if key != "decoder_hidden_size"}  # the head's
        if all(settings_equal(getattr(encoder, key), value) for key, value in encoder_keys.items()):
            return f"MiT-{name.upper()}" if mit else f"Swin-{name[0].upper()}"
    return "custom MiT" if mit else "custom Swin"


def architecture_name(config: PreTrainedConfig) -> str:
    """ "SeMask-FPN", "SeMask-Mask2Former", "SeMask-MaskFormer" or "SeMask-MiT"."""
    return MODEL_KINDS[model_kind(config)][0]


def describe_architecture(config: PreTrainedConfig, num_parameters: int) -> str:
    """The architecture section: encoder size, one table row per stage, decoder width and parameter count."""
    if model_kind(config) == "mit":
        return _describe_mit_architecture(config, num_parameters)
    encoder = encoder_config(config)
    rows = [
        f"| {index + 1} | {encoder.embed_dim * 2**index} | {depth} | {heads} | {blocks} | {kind} |"
        for index, (depth, heads, blocks, kind) in enumerate(
            zip(encoder.depths, encoder.num_heads, encoder.num_semantic_blocks, encoder.semantic_attention)
        )
    ]
    if model_kind(config) == "maskformer":
        detr = config.decoder_config
        heads = (
            "transformers' MaskFormer FPN pixel decoder and DETR transformer decoder, with a parameter-free semantic "
            "head on the prior maps"
        )
        decoder = [
            f"- Pixel decoder: FPN, {config.fpn_feature_size} channels, mask features {config.mask_feature_size}",
            f"- Transformer decoder: {detr.num_queries} queries, {detr.decoder_layers} DETR layers of width "
            f"{detr.d_model} ({detr.decoder_attention_heads} heads, FFN {detr.decoder_ffn_dim}) on the last stage; "
            f"semantic loss weight {config.semantic_loss_weight:g}",
        ]
    elif model_kind(config) == "mask2former":
        heads = (
            "transformers' Mask2Former pixel decoder and masked-attention transformer decoder, with a "
            "parameter-free semantic head on the prior maps"
        )
        decoder = [
            f"- Pixel decoder: {config.feature_size} channels, {config.encoder_layers} multi-scale deformable "
            f"attention layers (FFN {config.encoder_feedforward_dim}), mask features {config.mask_feature_size}",
            f"- Transformer decoder: {config.num_queries} queries, {config.decoder_layers - 1} layers of width "
            f"{config.hidden_dim} ({config.num_attention_heads} heads, FFN {config.dim_feedforward}); semantic loss "
            f"weight {config.semantic_loss_weight:g}",
        ]
    else:
        heads = "the semantic-FPN decode head with a semantic branch"
        decoder = [
            f"- Decoder: semantic FPN, {config.decoder_hidden_size} channels, output stride 4; semantic loss weight "
            f"{config.semantic_loss_weight:g}"
        ]
    return "\n".join(
        [
            "## Architecture",
            "",
            f"{architecture_name(config)}: a SeMask {encoder_size_name(config)} encoder (Swin Transformer stages, each "
            f"followed by a semantic layer that predicts a per-class prior map) and {heads}.",
            "",
            f"- Swin: embed_dim {encoder.embed_dim}, depths {list(encoder.depths)}, heads {list(encoder.num_heads)}, "
            f"window {encoder.window_size}, patch size {encoder.patch_size}, MLP ratio {encoder.mlp_ratio:g}",
            f"- Semantic layers: window {encoder.semantic_window_size} (never shifted); attention kind per stage "
            f"{list(encoder.semantic_attention)}",
            *decoder,
            f"- Parameters: {num_parameters / 1e6:.1f}M ({num_parameters:,})",
            "",
            "| stage | width | Swin blocks | heads | semantic blocks | semantic attention |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )


def _describe_mit_architecture(config: SemaskMitConfig, num_parameters: int) -> str:
    rows = [
        f"| {index + 1} | {width} | {depth} | {heads} | {ratio} | {blocks} | {kind} |"
        for index, (width, depth, heads, ratio, blocks, kind) in enumerate(
            zip(
                config.hidden_sizes,
                config.depths,
                config.num_attention_heads,
                config.sr_ratios,
                config.num_semantic_blocks,
                config.semantic_attention,
            )
        )
    ]
    head = (
        "SegFormer's all-MLP decode head"
        if config.decode_head == "mlp"
        else "the semantic-FPN decode head of SeMask-FPN"
    )
    return "\n".join(
        [
            "## Architecture",
            "",
            f"SeMask-MiT: a SeMask {encoder_size_name(config)} encoder (SegFormer's Mix Transformer stages, each "
            "ending with semantic attention blocks that predict a per-class prior map) and "
            f"{head}, with a semantic branch.",
            "",
            "No official SeMask-MiT code or weights exist: the paper names the Mix Transformer encoder but its code "
            "covers Swin only, so this design follows SeMask-Swin (`docs/mit.md` in the semask repository).",
            "",
            f"- Mix Transformer: widths {list(config.hidden_sizes)}, depths {list(config.depths)}, heads "
            f"{list(config.num_attention_heads)}, sequence reduction {list(config.sr_ratios)}, MLP ratios "
            f"{list(config.mlp_ratios)}",
            f"- Semantic blocks: window {config.semantic_window_size} (never shifted); attention kind per stage "
            f"{list(config.semantic_attention)}",
            f"- Decoder: {head}, {config.decoder_hidden_size} channels, output stride 4; semantic loss weight "
            f"{config.semantic_loss_weight:g}",
            f"- Parameters: {num_parameters / 1e6:.1f}M ({num_parameters:,})",
            "",
            "| stage | width | Mix Transformer blocks | heads | sequence reduction | semantic blocks | semantic "
            "attention |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def describe_labels(id2label: dict[int, str]) -> str:
    """The label section: class count and an index/name table, folded when long."""
    rows = "\n".join(f"| {index} | {_escape(name)} |" for index, name in sorted(id2label.items()))
    table = f"| id | label |\n|---|---|\n{rows}"
    if len(id2label) > LONG_LABEL_LIST:
        table = f"<details>\n<summary>All {len(id2label)} labels</summary>\n\n{table}\n\n</details>"
    return f"## Labels\n\n{len(id2label)} classes (index: name).\n\n{table}"


def describe_evaluation_protocol(processor: SemaskImageProcessor, config: PreTrainedConfig | None = None) -> str:
    """The evaluation protocol of the original test pipeline, with the processor's settings."""
    size = processor.size
    if size.shortest_edge and size.longest_edge:
        resize = (
            f"resized keeping its aspect ratio to fit {size.longest_edge}x{size.shortest_edge} (mmcv's rescale rule: "
            f"scale = min({size.longest_edge} / long side, {size.shortest_edge} / short side), sides rounded half up)"
        )
    else:
        resize = f"resized to {size.height}x{size.width} (height x width)"
    mean = ", ".join(f"{value:g}" for value in processor.image_mean)
    std = ", ".join(f"{value:g}" for value in processor.image_std)
    labels = (
        "Ground-truth label 0 is ignored and label k becomes k - 1 (ADE20K / COCO-Stuff label reduction)."
        if processor.do_reduce_labels
        else "Ground-truth labels are used as they are (no label reduction); 255 is ignored."
    )
    scales = ", ".join(f"{scale:g}" for scale in MS_FLIP_SCALES)
    if config is not None and is_mask_classification(config):
        origin = f"{architecture_name(config)} test pipeline (detectron2)"
        segment = (
            f"The model pads the image to a multiple of {config.size_divisibility} and predicts class-scored masks; "
            "the semantic inference (class probabilities without no-object times mask sigmoids, masks upsampled "
            "bilinearly) is cropped to the image and resized (bilinear) back to the original size."
        )
        averaged = "semantic inference scores (no softmax, as detectron2's test-time augmentation)"
    else:
        origin = "SeMask test pipeline (mmsegmentation 0.x)"
        segment = "The whole image is segmented at once; the logits are resized (bilinear) back to the original size."
        averaged = "softmax probabilities"
    return "\n".join(
        [
            "## Evaluation protocol",
            "",
            f"The original {origin}, which the saved image processor reproduces:",
            "",
            f"1. The image is {resize}.",
            f"2. It is normalised with the ImageNet mean ({mean}) and std ({std}) on the 0-255 RGB scale.",
            f"3. {segment}",
            f"4. {labels}",
            "",
            f'"ms+flip" averages the {averaged} over the scales {scales} of that size, each with and '
            "without a horizontal flip, at the original size (`semask.inference.predict_probabilities`).",
        ]
    )


def usage_snippets(model_id: str) -> str:
    """How to use the model: Auto classes (with semask or remote code), pipeline, ms+flip, fine-tuning."""
    return f"""## How to use

With the `semask` package installed (`import semask` registers SeMask with the Auto classes):

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

import semask  # noqa: F401

processor = AutoImageProcessor.from_pretrained("{model_id}")
model = AutoModelForSemanticSegmentation.from_pretrained("{model_id}").eval()
image = Image.open("image.jpg").convert("RGB")
with torch.no_grad():
    outputs = model(**processor(image, return_tensors="pt"))
label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
```

Without `semask`, the folder carries its code (this runs that code on your machine):

```python
processor = AutoImageProcessor.from_pretrained("{model_id}", trust_remote_code=True)
model = AutoModelForSemanticSegmentation.from_pretrained("{model_id}", trust_remote_code=True)
```

Pipeline (one mask per class present):

```python
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="{model_id}", trust_remote_code=True)
for segment in segmenter("image.jpg"):
    print(segment["label"], segment["mask"].size)
```

Multi-scale + flip inference (the "ms+flip" protocol) or sliding windows:

```python
from semask.inference import MS_FLIP_SCALES, predict_probabilities

probabilities = predict_probabilities(model, processor, image, scales=MS_FLIP_SCALES, flip=True)
label_map = probabilities.argmax(0)  # (height, width) at the image's size
```

Command line: `semask-segment --model {model_id} --output predictions images/` writes label maps and overlays.

### Fine-tuning

`scripts/train_semask.py` in the semask repository fine-tunes with the Trainer and the original recipe
(`--help` lists the options):

```bash
python scripts/train_semask.py --model_name_or_path {model_id} --dataset_name DATASET --output_dir semask-finetuned
```

In your own Trainer code:

```python
from transformers import Trainer, TrainingArguments

from semask.metrics import compute_metrics_for_trainer

model = AutoModelForSemanticSegmentation.from_pretrained(
    "{model_id}", id2label=id2label, ignore_mismatched_sizes=True  # a new label set re-initialises the classifiers
)
args = TrainingArguments(
    "semask-finetuned", remove_unused_columns=False, batch_eval_metrics=True, eval_strategy="epoch"
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=train_dataset,  # items with "pixel_values" and "labels", e.g. from the processor in set_transform
    eval_dataset=eval_dataset,
    compute_metrics=compute_metrics_for_trainer(model.config.num_labels),
)
trainer.train()
```"""


def _introduction(model_id: str, config: PreTrainedConfig, preset: str | None, base_model: str | None) -> str:
    lines = [
        f"# {model_id}",
        "",
        f"{architecture_name(config)} ({encoder_size_name(config)}) semantic segmentation model for Hugging Face "
        "Transformers, from "
        f"[SeMask: Semantically Masked Transformers for Semantic Segmentation]({PAPER_URL}) (Jain et al.).",
    ]
    if preset:
        lines.append(
            f"\nConverted with `semask.conversion` from the original `{preset}` checkpoint released in "
            f"[{ORIGINAL_REPO_URL}]({ORIGINAL_REPO_URL}); the weights are unchanged."
        )
    if base_model:
        lines.append(f"\nFine-tuned from [{base_model}](https://huggingface.co/{base_model}).")
    return "\n".join(lines)


def _results_section(config: PreTrainedConfig, preset: str | None, eval_results: dict | None) -> str:
    parts = []
    if preset:
        reported = ORIGINAL_RESULTS[preset]
        dataset = DATASETS[preset_dataset(preset)]
        parts.append(
            "\n".join(
                [
                    f"Reported in the original README for the released checkpoint ({dataset.title} {dataset.split} "
                    f"split, mIoU in %, training crop {reported.crop_size}, {reported.params} parameters); not "
                    "re-measured here:",
                    "",
                    "| model | dataset | mIoU (single scale) | mIoU (ms+flip) |",
                    "|---|---|---|---|",
                    f"| {preset} | {dataset.title} | {reported.mean_iou:.2f} | {reported.ms_flip_mean_iou:.2f} |",
                ]
            )
        )
    if eval_results:
        parts.append(_describe_eval_results(eval_results, config.id2label))
    return "## Results\n\n" + "\n\n".join(parts) if parts else ""


def _describe_eval_results(eval_results: dict, id2label: dict[int, str]) -> str:
    scalars = {key: value for key, value in eval_results.items() if isinstance(value, numbers.Real)}
    lines = ["Evaluation results of this model:", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" for key, value in scalars.items()]
    per_category = {key: value for key, value in eval_results.items() if isinstance(value, (list, tuple))}
    if per_category:
        header = " | ".join(per_category)
        rows = [
            f"| {_escape(id2label.get(index, str(index)))} | "
            + " | ".join(_format_value(values[index]) for values in per_category.values())
            + " |"
            for index in range(max(len(values) for values in per_category.values()))
        ]
        lines += [
            "",
            "<details>\n<summary>Per-class results</summary>",
            "",
            f"| label | {header} |",
            "|---" * (len(per_category) + 1) + "|",
            *rows,
            "",
            "</details>",
        ]
    return "\n".join(lines)


def _format_value(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.4g}"  # NaN: class absent from the evaluation


def _license_section(preset: str | None) -> str:
    text = "## License\n\nThe semask code (model, conversion, processor) is released under the MIT license."
    if preset:
        text += (
            " The weights are converted from the original SeMask release, which is licensed under the "
            f"Apache License 2.0 ([{ORIGINAL_REPO_URL}]({ORIGINAL_REPO_URL})); that license applies to them."
        )
    return text


def _saved_or_default_processor(
    save_directory: Path, dataset_key: str | None, config: PreTrainedConfig
) -> SemaskImageProcessor:
    if (save_directory / "preprocessor_config.json").is_file():
        return SemaskImageProcessor.from_pretrained(save_directory)
    if is_mask_classification(config):
        return SemaskImageProcessor(**MASK2FORMER_PROCESSING[dataset_key or "ade20k"])
    return SemaskImageProcessor.from_dataset(dataset_key) if dataset_key else SemaskImageProcessor()


def _is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hub repository id ("name" or "namespace/name"), as the metadata needs."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _dataset_tags(dataset_key: str | None, dataset_id: str | None) -> list[str]:
    tags = [dataset_key] if dataset_key else []
    if dataset_id and dataset_id.split("/")[-1] not in tags:
        tags.append(dataset_id.split("/")[-1])
    return tags


def _metadata_datasets(dataset_key: str | None, dataset_id: str | None) -> list[str]:
    names = [DATASETS[dataset_key].hub_id] if dataset_key else []
    return names + [dataset_id] if dataset_id and dataset_id not in names else names


def _reported_eval_results(preset: str) -> list[EvalResult]:
    reported = ORIGINAL_RESULTS[preset]
    dataset = DATASETS[preset_dataset(preset)]
    common = {
        "task_type": "image-segmentation",
        "task_name": "Semantic Segmentation",
        "dataset_type": dataset.hub_id,
        "dataset_name": dataset.title,
        "dataset_split": dataset.split,
        "metric_type": "mean_iou",
        "source_name": ORIGINAL_SOURCE_NAME,
        "source_url": ORIGINAL_REPO_URL,
    }
    return [
        EvalResult(**common, metric_name="mIoU (%)", metric_value=reported.mean_iou),
        EvalResult(
            **common, metric_name="mIoU ms+flip (%)", metric_config="ms+flip", metric_value=reported.ms_flip_mean_iou
        ),
    ]


def _trainer_eval_results(eval_results: dict, dataset: DatasetInfo | None) -> list[EvalResult]:
    """The finite scalar metrics for the model-index, when the dataset has a Hub id; the split is left unstated (it
    is not known), which also keeps them apart from the reported numbers, which the Hub would otherwise group under
    the original README as source."""
    if dataset is None or dataset.hub_id is None:
        return []
    return [
        EvalResult(
            task_type="image-segmentation",
            task_name="Semantic Segmentation",
            dataset_type=dataset.hub_id,
            dataset_name=dataset.title,
            metric_type=metric,
            metric_name=MODEL_INDEX_METRICS[metric],
            metric_value=float(value),
        )
        for key, value in eval_results.items()
        if (metric := key.removeprefix("eval_")) in MODEL_INDEX_METRICS
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
    ]


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


__all__ = ["ORIGINAL_RESULTS", "preset_dataset", "preset_mismatches", "write_model_card"]
