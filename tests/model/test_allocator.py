"""The malloc tuning applies under glibc and leaves a user's own allocator settings alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SNIPPET = "from mv2batch.model.allocator import keep_freed_memory; print(keep_freed_memory())"


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


# Four convolutions, the last one the same problem as the first: oneDNN compiles it again only if the cache
# dropped it. ONEDNN_VERBOSE=profile_create prints one line per kernel made ("create:cache_miss").
CONVOLUTIONS = """
import sys, torch
from mv2batch.model.allocator import limit_kernel_cache
print(limit_kernel_cache(int(sys.argv[1])) if len(sys.argv) > 1 else None)
weight = torch.rand(32, 32, 3, 3)
for size in (40, 41, 42, 40):
    torch.nn.functional.conv2d(torch.rand(1, 32, size, size), weight, padding=1)
"""


def _convolutions_compiled(*capacity: str, **env: str) -> tuple[str, int]:
    """(what limit_kernel_cache returned, convolution kernels oneDNN compiled) in a fresh process."""
    clean = {k: v for k, v in os.environ.items() if "PRIMITIVE_CACHE" not in k}
    done = subprocess.run([sys.executable, "-c", CONVOLUTIONS, *capacity], capture_output=True, text=True,
                          check=True, env={**clean, "ONEDNN_VERBOSE": "profile_create", **env})
    lines = done.stdout.splitlines()
    return lines[0], sum("create:cache_miss" in line and ",convolution," in line for line in lines)


def test_kernel_cache_is_capped_when_set_before_the_first_convolution():
    torch = pytest.importorskip("torch")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    assert _convolutions_compiled() == ("None", 3)  # the default cache keeps the first problem's kernel
    assert _convolutions_compiled("1") == ("True", 4)  # a one-kernel cache dropped it: made again


def test_a_users_kernel_cache_setting_wins():
    assert _convolutions_compiled("1", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024") == ("False", 3)


def test_a_cpu_run_caps_the_kernel_cache(tmp_path, monkeypatch, tiny_model):
    from conftest import classify, skimage_photos

    from mv2batch.model.allocator import PRIMITIVE_CACHE_CAPACITY, PRIMITIVE_CACHE_VARIABLES

    for name in PRIMITIVE_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "photos").mkdir()
    skimage_photos()["chelsea"].save(tmp_path / "photos" / "chelsea.jpg")
    classify(tmp_path / "photos", tmp_path / "out", tiny_model)
    assert os.environ[PRIMITIVE_CACHE_VARIABLES[0]] == str(PRIMITIVE_CACHE_CAPACITY)
