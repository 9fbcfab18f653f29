"""A small private tmpfs for the tests that fill the shared-memory directory.

A module of its own (not conftest.py) so that test modules can import it by name, as they do
``ray_support``. Mounting needs root (or CAP_SYS_ADMIN); where it is refused the test is skipped
with the reason, never run against the real /dev/shm, which is far too large to fill.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile

import pytest


@contextlib.contextmanager
def small_tmpfs(size_mb: int):
    """Yield the path of a fresh ``size_mb`` MB tmpfs; unmount and remove it afterwards."""
    path = tempfile.mkdtemp(prefix="miniray_test_tmpfs_")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", path],
            capture_output=True,
            text=True,
        )
    except OSError as exc:
        os.rmdir(path)
        pytest.skip(f"cannot run mount to make a {size_mb} MB tmpfs: {exc}")
    if done.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a {size_mb} MB tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(path)
