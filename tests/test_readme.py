"""The README's quick start runs as written and its comments state the real shapes."""

import re

from conftest import REPO_ROOT


def test_readme_quick_start_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    quick_start = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(quick_start, "README quick start", "exec"), namespace)
    outputs = namespace["outputs"]
    assert tuple(outputs.logits.shape) == (1, 150, 128, 171)
    assert tuple(outputs.semantic_logits.shape) == (1, 150, 128, 171)
    assert len(outputs.semantic_priors) == 4 and outputs.loss.ndim == 0
