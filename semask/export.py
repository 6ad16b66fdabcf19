"""Export `SemaskForSemanticSegmentation` to ONNX (or to a `torch.export` program) with a dynamic batch size,
height and width.

The graph is traced once, at an example size, and runs at any image size: while exporting, the model pads and
crops with arithmetic on the (symbolic) sizes rather than branching on them.
"""

import importlib.util
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
from torch import nn

from .configuration_semask import SemaskConfig
from .modeling_semask import SemaskForSemanticSegmentation

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("logits", "semantic_logits")  # semantic_logits only for models with semantic layers
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
EXAMPLE_BATCH_SIZE = 2  # PyTorch fixes sizes of 1 in exported programs


class SegmentationLogits(nn.Module):
    """The model with plain tensor outputs: `(logits, semantic_logits)`, or `(logits,)` without semantic layers."""

    def __init__(self, model: SemaskForSemanticSegmentation):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values)
        if outputs.semantic_logits is None:
            return (outputs.logits,)
        return outputs.logits, outputs.semantic_logits


def output_stride(config: SemaskConfig) -> int:
    """Input pixels per token of the last stage."""
    return config.patch_size * 2 ** (config.num_layers - 1)


def default_example_size(config: SemaskConfig) -> tuple[int, int]:
    """An example size with at least two windows per axis in every stage, and height != width.

    The last stage gets `2 * window + 1` rows and `2 * window + 2` columns of tokens. The ONNX graph does not
    depend on the example size; the input checks of `export_program`'s program do (see there).
    """
    window = max(config.window_size, config.semantic_window_size)
    stride = output_stride(config)
    return stride * (2 * window + 1) - 1, stride * (2 * window + 2) - 1


def check_example_size(example_size: tuple[int, int]) -> tuple[int, int]:
    """`example_size` as (height, width) ints; a ValueError unless it is two positive sizes."""
    size = tuple(example_size)
    if len(size) != 2 or not all(isinstance(length, int) and length > 0 for length in size):
        raise ValueError(f"example_size must be (height, width), two positive ints; got {example_size!r}.")
    return size


@contextmanager
def attention_implementation(model: SemaskForSemanticSegmentation, implementation: str | None):
    """Run the block with `model` set to this attention implementation (None: unchanged), then restore it."""
    original = model.config._attn_implementation
    if implementation is None or implementation == original:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


def size_oblivious_tracing():
    """Trace without guards from PyTorch's layout checks (is this crop contiguous, is this size 1) on symbolic sizes.

    Without it, the exported program's input checks would only accept sizes shaped like the example's.
    """
    if hasattr(fx_config, "backed_size_oblivious"):
        return fx_config.patch(backed_size_oblivious=True)
    return nullcontext()


def uses_sdpa(program: torch.export.ExportedProgram) -> bool:
    """Whether the program calls PyTorch's scaled-dot-product attention."""
    return any(node.target == torch.ops.aten.scaled_dot_product_attention.default for node in program.graph.nodes)


def export_program(
    model: SemaskForSemanticSegmentation,
    example_size: tuple[int, int] | None = None,
    attn_implementation: str | None = None,
) -> torch.export.ExportedProgram:
    """`torch.export` the model, in eval mode, with a dynamic batch size, height and width.

    The program takes `pixel_values` and returns `(logits, semantic_logits)` (or `(logits,)` without semantic
    layers). `example_size` (height, width) is the size traced at (default: `default_example_size`);
    `attn_implementation` traces with another attention implementation (the model's own is restored after).
    The graph runs at any size, but `program.module()` checks its inputs against guards PyTorch derives from
    the example: at the default example size, batches of 2 or more, sides of at least `output_stride + 1`
    pixels, and sizes at which the last stages have more than one window per axis.
    """
    if not isinstance(model, SemaskForSemanticSegmentation):
        raise TypeError(f"Only SemaskForSemanticSegmentation models can be exported, not {type(model).__name__}.")
    if model.training:
        raise ValueError("The model is in training mode: call model.eval() before exporting it.")
    config = model.config
    height, width = check_example_size(example_size or default_example_size(config))
    parameter = next(model.parameters())
    example = torch.randn(
        EXAMPLE_BATCH_SIZE, config.num_channels, height, width, device=parameter.device, dtype=parameter.dtype
    )
    dynamic_shapes = {INPUT_NAME: {axis: torch.export.Dim.DYNAMIC for axis in DYNAMIC_AXES}}
    with attention_implementation(model, attn_implementation), size_oblivious_tracing():
        return torch.export.export(SegmentationLogits(model), (example,), dynamic_shapes=dynamic_shapes, strict=False)


def export_onnx(
    model: SemaskForSemanticSegmentation | torch.export.ExportedProgram,
    path: str | Path,
    example_size: tuple[int, int] | None = None,
    opset: int | None = None,
    overwrite: bool = False,
    optimize: bool = True,
) -> Path:
    """Export to an ONNX file with input `pixel_values` (batch, channels, height, width), dynamic batch/height/width.

    Outputs: `logits` and, when the model has semantic layers, `semantic_logits`, both at stride 4 as the model
    returns them. `model` is a `SemaskForSemanticSegmentation` in eval mode, traced with eager attention (the
    ONNX graph is the same for SDPA models; torch.onnx cannot yet convert the SDPA path of transformers' Swin
    attention), or a program made by `export_program`. `opset` defaults to torch.onnx's; an existing `path` is
    only replaced with `overwrite=True`. Needs the `onnx` and `onnxscript` packages; returns `path`.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give the path of the .onnx file to write.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True to replace it.")
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {' and '.join(missing)}: pip install onnx onnxscript onnxruntime")
    if isinstance(model, torch.export.ExportedProgram):
        if example_size is not None:
            raise ValueError("example_size applies when exporting a model, not an exported program.")
        program = model
    else:
        program = export_program(model, example_size, attn_implementation="eager")
    names = OUTPUT_NAMES[: len(program.graph_signature.user_outputs)]
    try:
        onnx_program = torch.onnx.export(
            program,
            program.example_inputs[0],
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(names),
            opset_version=opset,
            optimize=optimize,
        )
    except Exception as error:
        if uses_sdpa(program):
            raise RuntimeError(
                "torch.onnx could not convert this program, traced with SDPA attention: pass the model itself to "
                "export_onnx, or trace it with export_program(model, attn_implementation='eager')."
            ) from error
        raise
    input_shape = onnx_program.model.graph.inputs[0].shape
    onnx_program.rename_axes({input_shape[axis]: name for axis, name in DYNAMIC_AXES.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(path)
    return path
