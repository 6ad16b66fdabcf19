"""docs/variants.md lists every released model with the original README's numbers, as the model cards do."""

import re

from conftest import REPO_ROOT
from semask.modelcard import MODEL_KINDS, ORIGINAL_RESULTS

ROW = re.compile(
    r"^\| `(?P<preset>[\w-]+)` \| (?P<model>[^|]+) \| (?P<crop>\S+) \| (?P<miou>[\d.]+) \| (?P<ms>[\d.]+) "
    r"\| (?P<params>\S+) \|$"
)


def test_the_variants_table_equals_the_reported_results():
    text = (REPO_ROOT / "docs" / "variants.md").read_text()
    rows = {match["preset"]: match for line in text.splitlines() if (match := ROW.match(line))}
    assert set(rows) == set(ORIGINAL_RESULTS)
    kind_names = {preset: name for name, _, _, presets in MODEL_KINDS.values() for preset in presets}
    for preset, row in rows.items():
        reported = ORIGINAL_RESULTS[preset]
        assert row["model"].startswith(kind_names[preset]), preset
        assert (row["crop"], row["params"]) == (reported.crop_size, reported.params), preset
        assert (float(row["miou"]), float(row["ms"])) == (reported.mean_iou, reported.ms_flip_mean_iou), preset
