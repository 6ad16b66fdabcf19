"""`semask.allocator.keep_freed_memory`: large tensors allocated again reuse freed memory instead of page-faulting
fresh pages in (measured in fresh processes, which the setting changes for good)."""

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from semask.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    tensor = torch.ones(50_000_000)  # 200 MB: far above glibc's 32 MB mmap threshold
    del tensor
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> tuple[str, int]:
    output = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = output.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    applied, kept = page_faults("keep")
    _, default = page_faults("default")
    assert applied == "True"
    # by default every allocation maps 200 MB afresh (about 49k pages each); kept, only the first one faults them in
    assert default > 3 * 45_000 and kept < default / 2, (kept, default)
