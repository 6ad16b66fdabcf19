"""Size arithmetic shared by the models and the image processor, valid on torch.export's symbolic sizes.

The only export-specific code of the models is here: while exporting, sizes are symbolic, and a Python branch on
them would fix the exported graph to the example's case. `sizes_differ` then answers True, so the model takes the
general branch (padding by 0 or resizing to the same size changes nothing).
"""

import torch


def round_up(size: int, multiple: int) -> int:
    """`size` rounded up to a multiple of `multiple`, written so that torch.export sees that it divides evenly."""
    return (size + multiple - 1) // multiple * multiple


def sizes_differ(*sizes: tuple[int, ...]) -> bool:
    """Whether the given sizes are not all equal; always True while exporting (see the module docstring)."""
    return torch.compiler.is_exporting() or len({tuple(size) for size in sizes}) > 1


def padded_to(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of `multiple`."""
    return round_up(size[0], multiple), round_up(size[1], multiple)
