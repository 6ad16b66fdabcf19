"""Export with a dynamic batch size, height and width: ONNX (run with onnxruntime) and torch.export programs.

The tiny model is traced once per module, at one size, and run at others, including sizes that are not multiples
of the patch size or of the window, against the eager model.
"""

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import tiny_config_kwargs  # noqa: E402
from semask import SemaskConfig, SemaskForSemanticSegmentation  # noqa: E402
from semask.export import default_example_size, export_onnx, export_program  # noqa: E402

ATOL = 1e-4
# (batch, height, width); windows are 4 tokens of 4 pixels: 70x130, 33x47 and 5x9 are not multiples of 16 pixels,
# and 5x9 leaves the last stages a single token
ONNX_SIZES = [(1, 64, 64), (2, 70, 130), (3, 33, 47), (1, 96, 80), (2, 5, 9)]
# `program.module()` checks its inputs: batches of 2 or more, last stages with more than one window per axis
PROGRAM_SIZES = [(3, 129, 131), (2, 70, 130)]


@pytest.fixture(scope="module")
def model():
    """The tiny SeMask (SDPA attention) with non-zero semantic gates, so that the semantic layers matter."""
    torch.manual_seed(0)
    config = SemaskConfig(**tiny_config_kwargs())
    model = SemaskForSemanticSegmentation._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def program(model):
    """One trace for both tests: with eager attention, as `export_onnx` traces models (SDPA does not convert)."""
    program = export_program(model, attn_implementation="eager")
    assert model.config._attn_implementation == "sdpa"  # given back
    return program


@pytest.fixture(scope="module")
def onnx_path(program, tmp_path_factory):
    return export_onnx(program, tmp_path_factory.mktemp("onnx") / "semask.onnx")


def eager_outputs(model, pixel_values):
    with torch.no_grad():
        outputs = model(pixel_values)
    return outputs.logits.numpy(), outputs.semantic_logits.numpy()


def random_pixels(batch_size, height, width):
    return torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(height * width))


def test_onnx_graph_has_dynamic_batch_height_and_width(model, onnx_path):
    graph = onnx.load(onnx_path).graph
    dims = lambda value: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]  # noqa: E731
    assert [value.name for value in graph.input] == ["pixel_values"]
    assert dims(graph.input[0]) == ["batch", 3, "height", "width"]
    assert [value.name for value in graph.output] == ["logits", "semantic_logits"]
    for output in graph.output:
        batch, num_labels, height, width = dims(output)
        assert (batch, num_labels) == ("batch", 5)
        assert "height" in height and "width" in width


def test_onnxruntime_matches_eager_at_other_sizes(model, onnx_path):
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert default_example_size(model.config) not in {size[1:] for size in ONNX_SIZES}
    for size in ONNX_SIZES:
        pixel_values = random_pixels(*size)
        logits, semantic_logits = session.run(None, {"pixel_values": pixel_values.numpy()})
        expected_logits, expected_semantic_logits = eager_outputs(model, pixel_values)
        assert logits.shape == expected_logits.shape == (size[0], 5, -(-size[1] // 4), -(-size[2] // 4))
        np.testing.assert_allclose(logits, expected_logits, atol=ATOL, rtol=0, err_msg=f"logits at {size}")
        np.testing.assert_allclose(
            semantic_logits, expected_semantic_logits, atol=ATOL, rtol=0, err_msg=f"semantic_logits at {size}"
        )


def test_torch_export_program_matches_eager_at_other_sizes(model, program):
    pixel_values_node = next(node for node in program.graph.nodes if node.op == "placeholder" and "pixel" in node.name)
    batch, _, height, width = pixel_values_node.meta["val"].shape
    assert all(isinstance(length, torch.SymInt) for length in (batch, height, width))
    exported = program.module()
    assert default_example_size(model.config) not in {size[1:] for size in PROGRAM_SIZES}
    for size in PROGRAM_SIZES:
        pixel_values = random_pixels(*size)
        with torch.no_grad():
            logits, semantic_logits = exported(pixel_values)
        expected_logits, expected_semantic_logits = eager_outputs(model, pixel_values)
        np.testing.assert_allclose(logits.numpy(), expected_logits, atol=1e-5, rtol=0, err_msg=f"logits at {size}")
        np.testing.assert_allclose(semantic_logits.numpy(), expected_semantic_logits, atol=1e-5, rtol=0)


def test_export_onnx_refuses_to_overwrite(model, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(model, path)
    assert path.read_bytes() == b"keep me"
    with pytest.raises(IsADirectoryError):
        export_onnx(model, tmp_path)


def test_export_refuses_training_mode_bad_example_sizes_and_other_models(model, tmp_path):
    training = SemaskForSemanticSegmentation(model.config).train()
    with pytest.raises(ValueError, match="model.eval()"):
        export_onnx(training, tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="example_size"):
        export_onnx(model, tmp_path / "model.onnx", example_size=(0, 64))
    with pytest.raises(TypeError, match="SemaskForSemanticSegmentation"):
        export_onnx(model.semask, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
