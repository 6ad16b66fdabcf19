"""SeMask-Mask2Former in the transformers ecosystem: save / load, Auto classes, remote code, processor, pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
    AutoModelForUniversalSegmentation,
)

from conftest import tiny_mask2former_config_kwargs
from semask import SemaskImageProcessor, SemaskMask2FormerConfig, SemaskMask2FormerForUniversalSegmentation
from semask.inference import predict_logits, predict_probabilities
from semask.modeling_semask_mask2former import SemaskMask2FormerModel

REMOTE_SCRIPT = """
import json, sys
if sys.argv[2] == "remote":
    sys.modules["semask"] = None  # semask not importable: the folder's own code must be used
else:
    import semask
import torch
import transformers
from PIL import Image
from transformers import pipeline

folder, how, image, auto_class = sys.argv[1:5]
kwargs = {"trust_remote_code": True} if how == "remote" else {}
model = getattr(transformers, auto_class).from_pretrained(folder, **kwargs)
with torch.no_grad():
    masks = model(torch.load(folder + "/../pixel_values.pt")).masks_queries_logits
torch.testing.assert_close(masks, torch.load(folder + "/../masks.pt"), rtol=0, atol=0)
segmenter = pipeline("image-segmentation", model=folder, **kwargs)
print(json.dumps({
    "model": type(model).__module__ + "." + type(model).__name__,
    "pipeline_model": type(segmenter.model).__name__,
    "segments": [{"label": r["label"], "size": list(r["mask"].size), "pixels": sum(v > 0 for v in r["mask"].getdata())}
                 for r in segmenter(Image.open(image))],
}))
"""


def run_remote_script(folder, how: str, tmp_path, auto_class: str = "AutoModelForUniversalSegmentation") -> dict:
    """`REMOTE_SCRIPT`'s report on a saved folder (its inputs `pixel_values.pt`, `masks.pt`, `image.png` beside it),
    loaded with `auto_class` in a fresh process with an empty Hub cache."""
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), how, str(folder.parent / "image.png"), auto_class],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_remote_inputs(model, folder) -> Image.Image:
    """Beside a saved `folder`, the inputs of `run_remote_script`: a test image, an input and `model`'s mask
    predictions for it; returns the image."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    image.save(folder.parent / "image.png")
    pixel_values = torch.randn(1, 3, 64, 80)
    torch.save(pixel_values, folder.parent / "pixel_values.pt")
    with torch.no_grad():
        torch.save(model.eval()(pixel_values).masks_queries_logits, folder.parent / "masks.pt")
    return image


def pipeline_segments(model, processor, image: Image.Image) -> list[dict]:
    """The segments `REMOTE_SCRIPT` should report for `image`: the processor's semantic post-processing of `model`'s
    outputs, one segment per class present."""
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    labels, counts = segmentation.unique(return_counts=True)
    return [
        {"label": model.config.id2label[int(label)], "size": list(image.size), "pixels": int(count)}
        for label, count in zip(labels, counts)
    ]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny SeMask-Mask2Former with its processor, a test image, an input and its mask predictions."""
    torch.manual_seed(0)
    model = SemaskMask2FormerForUniversalSegmentation(SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs()))
    model.eval()
    processor = SemaskImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, do_reduce_labels=False)
    folder = tmp_path_factory.mktemp("saved") / "semask-mask2former-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder, write_remote_inputs(model, folder)


def test_save_load_round_trip_and_auto_classes(saved):
    model, _, folder, _ = saved
    names = {path.name for path in folder.iterdir()}
    code = {"configuration_semask_mask2former.py", "modeling_semask_mask2former.py", "modeling_semask.py"}
    assert (
        code | {"config.json", "model.safetensors", "preprocessor_config.json", "image_processing_semask.py"} <= names
    )
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForUniversalSegmentation"] == auto_map["AutoModelForSemanticSegmentation"]
    assert auto_map["AutoConfig"] == "configuration_semask_mask2former.SemaskMask2FormerConfig"

    assert type(AutoConfig.from_pretrained(folder)) is SemaskMask2FormerConfig
    assert type(AutoModel.from_pretrained(folder)) is SemaskMask2FormerModel
    assert type(AutoImageProcessor.from_pretrained(folder)) is SemaskImageProcessor
    pixel_values = torch.randn(1, 3, 64, 64)
    for auto_class in (AutoModelForUniversalSegmentation, AutoModelForSemanticSegmentation):
        reloaded = auto_class.from_pretrained(folder)
        assert type(reloaded) is SemaskMask2FormerForUniversalSegmentation and not reloaded.training
        with torch.no_grad():
            torch.testing.assert_close(reloaded(pixel_values).semantic_logits, model(pixel_values).semantic_logits)
    assert reloaded.config.backbone_config.id2label == model.config.id2label


def test_a_new_label_set_reinitialises_every_class_projection(saved):
    _, _, folder, _ = saved
    model, info = SemaskMask2FormerForUniversalSegmentation.from_pretrained(
        folder, id2label={0: "a", 1: "b", 2: "c"}, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert model.config.backbone_config.id2label == {0: "a", 1: "b", 2: "c"}
    mismatched = {key.rsplit(".", 2)[-2] for key, *_ in info["mismatched_keys"]}
    assert mismatched == {"class_predictor", "q_proj", "k_proj", "criterion"}
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 64))
    assert outputs.class_queries_logits.shape[-1] == 4 and outputs.semantic_logits.shape[1] == 3


@pytest.mark.parametrize("how", ["installed", "remote"])
def test_remote_code_and_pipeline(saved, how, tmp_path):
    model, processor, folder, image = saved
    report = run_remote_script(folder, how, tmp_path)
    assert report["model"].startswith("semask." if how == "installed" else "transformers_modules.")
    assert report["pipeline_model"] == "SemaskMask2FormerForUniversalSegmentation"
    assert report["segments"] == pipeline_segments(model, processor, image)


def test_post_processing_crops_the_padding_like_whole_inference(saved):
    model, processor, _, image = saved
    inputs = processor(image, return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (64, 100)  # the model pads it to 64 x 128
    with torch.no_grad():
        outputs = model(**inputs)
    result = processor.post_process_semantic_segmentation(
        outputs, target_sizes=[(45, 70)], return_segmentation_scores=True
    )[0]
    whole = predict_probabilities(model, processor, image)
    torch.testing.assert_close(result.segmentation_scores, whole)
    torch.testing.assert_close(result.segmentation, whole.argmax(0))
    uncropped = processor.post_process_semantic_segmentation(outputs)[0]
    assert uncropped.shape == (64, 128)


def test_multi_scale_flip_averages_semantic_inference_without_softmax(saved):
    model, processor, _, image = saved
    scales = (0.75, 1.0)
    expected = 0
    for ratio in scales:
        size = {"shortest_edge": int(64 * ratio), "longest_edge": int(128 * ratio)}
        pixel_values = processor(image, size=size, return_tensors="pt")["pixel_values"]
        expected += predict_logits(model, pixel_values, output_size=(45, 70))[0]
        expected += predict_logits(model, pixel_values.flip(-1), output_size=(45, 70))[0].flip(-1)
    probabilities = predict_probabilities(model, processor, image, scales=scales, flip=True)
    torch.testing.assert_close(probabilities, expected / 4)
    # sliding windows that cover the image reproduce whole inference
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    whole = predict_logits(model, pixel_values)
    torch.testing.assert_close(predict_logits(model, pixel_values, mode="slide", crop_size=(64, 100)), whole)


def test_segment_command_writes_label_maps_and_priors(saved, tmp_path):
    from semask.cli import main as segment

    _, processor, folder, image = saved
    arguments = ["--model", str(folder), "--output", str(tmp_path), "--save-priors"]
    assert segment([*arguments, str(folder.parent / "image.png")]) == 0
    assert {path.name for path in tmp_path.iterdir()} >= {"image_labels.png", "image_overlay.png", "image_priors.png"}
    model = SemaskMask2FormerForUniversalSegmentation.from_pretrained(folder)
    expected = predict_probabilities(model, processor, image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "image_labels.png")), expected.argmax(0).numpy())
