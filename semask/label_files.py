"""Label-name files: the JSON list, or {id: name} object with the ids 0..N-1, that training and conversion read."""

import json
from pathlib import Path


class LabelsFileError(ValueError):
    """A labels file that cannot be read or does not name the classes 0..N-1; the message names the file."""


def read_labels_file(path: str | Path) -> dict[int, str]:
    """Label names from a JSON list, or a {id: name} object with the ids 0..N-1."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise LabelsFileError(f"Cannot read the labels file {path}: {error}") from error
    if isinstance(content, list):
        content = dict(enumerate(content))
    if not isinstance(content, dict) or not content:
        raise LabelsFileError(f"The labels file {path} must hold a non-empty JSON list or object, got {type(content)}.")
    try:
        id2label = {int(key): str(name) for key, name in content.items()}
    except ValueError as error:
        raise LabelsFileError(f"The labels file {path} has non-integer ids: {error}") from error
    expected = range(len(content))
    if sorted(id2label) != list(expected):
        missing = sorted(set(expected) - set(id2label))  # never empty: ids beyond N-1 or repeated ("0", "00")
        raise LabelsFileError(
            f"The labels file {path} must use the ids 0..{len(content) - 1}, got {sorted(id2label)} "
            f"(missing ids: {missing})."
        )
    return dict(sorted(id2label.items()))
