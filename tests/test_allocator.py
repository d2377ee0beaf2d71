"""keep_freed_memory: a block above glibc's mmap threshold comes from the heap afterwards, and the
user's own environment settings stand. Each case runs in a fresh process, since the setting lasts
for the rest of the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from seft_trl.allocator import ENVIRONMENT, is_glibc

# Allocates and frees 100 MiB, and reports how far the [heap] mapping grew and whether freeing shrank it.
PROBE = """
import json, sys, torch
from seft_trl import keep_freed_memory

def heap_mib():
    for line in open("/proc/self/maps"):
        if "[heap]" in line:
            start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
            return (end - start) / 2**20
    return 0.0

changed = keep_freed_memory() if sys.argv[1] == "keep" else None
before = heap_mib()
block = torch.ones(100 * 2**20 // 4)
grown = heap_mib() - before
del block
print(json.dumps({"changed": changed, "grown": grown, "returned": before + grown - heap_mib()}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {key: value for key, value in os.environ.items() if key not in ENVIRONMENT}
    result = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not is_glibc(), reason="the thresholds are glibc's malloc parameters")


def test_blocks_above_the_default_threshold_come_from_the_heap_and_stay_there():
    default = probe("leave")
    assert default["grown"] < 50  # glibc's own threshold is at most 32 MiB: the block is a mapping of its own
    kept = probe("keep")
    assert kept["changed"] is True
    assert kept["grown"] >= 90  # the heap grew by the block (less what it had free)
    assert kept["returned"] == 0  # and freeing it gave nothing back to the system


def test_a_threshold_set_in_the_environment_is_left_alone():
    kept = probe("keep", MALLOC_TRIM_THRESHOLD_=str(2**20))
    assert kept["changed"] is False
    assert kept["grown"] < 50  # the environment set no mmap threshold, so glibc's own still applies
