"""pipeline("image-segmentation") and AutoImageProcessor on a saved tiny SeMask, in fresh processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation, SemaskImageProcessor

PIPELINE_SCRIPT = """
import json, sys
if sys.argv[2] == "remote":
    sys.modules["semask"] = None  # semask not importable: the folder's own code must be used
else:
    import semask
from PIL import Image
from transformers import AutoImageProcessor, pipeline
kwargs = {"trust_remote_code": True} if sys.argv[2] == "remote" else {}
processor = AutoImageProcessor.from_pretrained(sys.argv[1], **kwargs)
segmenter = pipeline("image-segmentation", model=sys.argv[1], **kwargs)
results = segmenter(Image.open(sys.argv[3]))
print(json.dumps({
    "processor": type(processor).__name__,
    "model": type(segmenter.model).__module__ + "." + type(segmenter.model).__name__,
    "segments": [{"label": r["label"], "size": list(r["mask"].size), "mode": r["mask"].mode,
                  "values": sorted(set(r["mask"].getdata()))} for r in results],
}))
"""


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-semask")
    torch.manual_seed(0)
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).eval()
    processor = SemaskImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, do_reduce_labels=False)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image_path = folder.parent / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(image_path)
    expected = processor.post_process_semantic_segmentation(
        model(**processor(Image.open(image_path), return_tensors="pt")), target_sizes=[(45, 70)]
    )[0]
    return folder, image_path, expected, model.config.id2label


@pytest.mark.parametrize("how", ["installed", "remote"])
def test_pipeline_returns_one_mask_per_present_class(saved_model, how):
    folder, image_path, expected, id2label = saved_model
    result = subprocess.run(
        [sys.executable, "-c", PIPELINE_SCRIPT, str(folder), how, str(image_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["processor"] == "SemaskImageProcessor"
    assert report["model"].endswith("modeling_semask.SemaskForSemanticSegmentation")
    assert report["model"].startswith("semask." if how == "installed" else "transformers_modules.")
    present = sorted(int(label) for label in expected.unique())
    assert [segment["label"] for segment in report["segments"]] == [id2label[label] for label in present]
    for segment in report["segments"]:
        assert segment["size"] == [70, 45] and segment["mode"] == "L" and segment["values"] in ([0, 255], [255])
