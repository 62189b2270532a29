"""The malloc tuning applies under glibc and leaves a user's own allocator settings alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SNIPPET = "from mv2batch.allocator import keep_freed_memory; print(keep_freed_memory())"


def _in_child(**env: str) -> str:
    """keep_freed_memory() in a fresh process: mallopt changes the process for good."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", SNIPPET], env={**clean, **env}, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tunes_glibc_malloc():
    assert _in_child() == "True"


def test_a_users_malloc_settings_win():
    assert _in_child(MALLOC_ARENA_MAX="2") == "False"
    assert _in_child(GLIBC_TUNABLES="glibc.malloc.trim_threshold=0") == "False"
