"""SeMask-MiT in the transformers ecosystem: save / load, Auto classes, remote code without semask, processor,
pipeline and semask.inference."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_mask2former_auto import pipeline_segments
from test_mit import mit_config, set_gammas
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, pipeline

from semask import SemaskImageProcessor, SemaskMitConfig, SemaskMitForSemanticSegmentation, SemaskMitModel
from semask.inference import predict_probabilities

REMOTE_SCRIPT = """
import json, sys
sys.modules["semask"] = None  # semask is not importable: the folder's own code must be used
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoModelForSemanticSegmentation, pipeline

folder = sys.argv[1]
model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    outputs = model(torch.load(folder + "/../pixel_values.pt"))
expected = torch.load(folder + "/../outputs.pt")
torch.testing.assert_close(outputs.logits, expected["logits"], rtol=0, atol=0)
torch.testing.assert_close(outputs.semantic_logits, expected["semantic_logits"], rtol=0, atol=0)
encoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
print(json.dumps({
    "model": type(model).__module__ + "." + type(model).__name__,
    "encoder": type(encoder).__name__,
    "pipeline_model": type(segmenter.model).__name__,
    "segments": [{"label": r["label"], "size": list(r["mask"].size), "pixels": sum(v > 0 for v in r["mask"].getdata())}
                 for r in segmenter(Image.open(sys.argv[2]))],
}))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny SeMask-MiT (semantic gates open) with SegFormer's ADE20K processor settings at a small size, a test
    image, an input and the model's outputs for it."""
    torch.manual_seed(0)
    model = SemaskMitForSemanticSegmentation(mit_config()).eval()
    set_gammas(model, 0.7)
    processor = SemaskImageProcessor.from_dataset("ade20k", size={"shortest_edge": 64, "longest_edge": 128})
    folder = tmp_path_factory.mktemp("saved") / "semask-mit-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    image.save(folder.parent / "image.png")
    pixel_values = torch.randn(1, 3, 44, 52)
    torch.save(pixel_values, folder.parent / "pixel_values.pt")
    with torch.no_grad():
        outputs = model(pixel_values)
    torch.save({"logits": outputs.logits, "semantic_logits": outputs.semantic_logits}, folder.parent / "outputs.pt")
    return model, processor, folder, image


def test_save_load_round_trip_and_auto_classes(saved):
    model, _, folder, _ = saved
    names = {path.name for path in folder.iterdir()}
    code = {"configuration_semask_mit.py", "modeling_semask_mit.py", "modeling_semask.py", "presets.py"}
    assert (
        code | {"config.json", "model.safetensors", "preprocessor_config.json", "image_processing_semask.py"} <= names
    )
    saved_config = json.loads((folder / "config.json").read_text())
    assert saved_config["auto_map"] == {
        "AutoConfig": "configuration_semask_mit.SemaskMitConfig",
        "AutoModel": "modeling_semask_mit.SemaskMitModel",
        "AutoModelForSemanticSegmentation": "modeling_semask_mit.SemaskMitForSemanticSegmentation",
    }
    assert saved_config["model_type"] == "semask_mit"

    reloaded = SemaskMitForSemanticSegmentation.from_pretrained(folder)
    assert not reloaded.training
    for (name, expected), (_, actual) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
    settings = [{k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"} for m in (model, reloaded)]
    assert settings[0] == settings[1] and settings[1]["semantic_attention"] == [
        "windowed",
        "windowed",
        "global",
        "global",
    ]
    assert type(AutoConfig.from_pretrained(folder)) is SemaskMitConfig
    assert type(AutoImageProcessor.from_pretrained(folder)) is SemaskImageProcessor
    encoder = AutoModel.from_pretrained(folder)
    segmenter = AutoModelForSemanticSegmentation.from_pretrained(folder)
    assert type(encoder) is SemaskMitModel and type(segmenter) is SemaskMitForSemanticSegmentation
    pixel_values = torch.load(folder.parent / "pixel_values.pt")
    expected = torch.load(folder.parent / "outputs.pt")
    with torch.no_grad():
        torch.testing.assert_close(segmenter(pixel_values).logits, expected["logits"], rtol=0, atol=0)
        features = encoder(pixel_values).feature_maps
        torch.testing.assert_close(features[-1], model.segformer(pixel_values).feature_maps[-1], rtol=0, atol=0)


def test_a_new_label_set_reinitialises_the_class_projections_and_classifier(saved):
    _, _, folder, _ = saved
    model, info = SemaskMitForSemanticSegmentation.from_pretrained(
        folder, id2label={0: "a", 1: "b", 2: "c"}, ignore_mismatched_sizes=True, output_loading_info=True
    )
    mismatched = {key.rsplit(".", 2)[-2] for key, *_ in info["mismatched_keys"]}
    assert mismatched == {"q_proj", "k_proj", "classifier"}
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 32, 32))
    assert outputs.logits.shape[1] == outputs.semantic_logits.shape[1] == 3


def test_remote_code_without_semask_and_pipeline(saved, tmp_path):
    model, processor, folder, image = saved
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(folder.parent / "image.png")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"].startswith("transformers_modules.")
    assert report["model"].endswith("modeling_semask_mit.SemaskMitForSemanticSegmentation")
    assert report["encoder"] == "SemaskMitModel" and report["pipeline_model"] == "SemaskMitForSemanticSegmentation"
    segments = pipeline_segments(model, processor, image)
    assert len(segments) >= 2 and report["segments"] == segments


def test_whole_image_inference_follows_the_original_protocol(saved):
    model, processor, _, image = saved
    inputs = processor(image, return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (64, 100)  # keep-ratio resize to fit (128, 64)
    probabilities = predict_probabilities(model, processor, image)
    with torch.no_grad():
        logits = model(**inputs).logits
    # mmseg's EncoderDecoder: logits resized to the network input, then to the image; softmax over classes
    resized = F.interpolate(F.interpolate(logits, size=(64, 100), mode="bilinear"), size=(45, 70), mode="bilinear")
    torch.testing.assert_close(probabilities, resized.softmax(1)[0])


def test_pipeline_with_semask_installed(saved):
    model, processor, folder, image = saved
    segments = pipeline("image-segmentation", model=str(folder))(image)
    assert type(AutoModelForSemanticSegmentation.from_pretrained(folder)) is SemaskMitForSemanticSegmentation
    reported = [
        {"label": s["label"], "size": list(s["mask"].size), "pixels": int((np.asarray(s["mask"]) > 0).sum())}
        for s in segments
    ]
    assert reported == pipeline_segments(model, processor, image)
