"""The extension's build: the prebuild command (a real subprocess) and a failing build's error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import roi_kernels  # noqa: F401  (builds the extension into the session's cache folder first)
from roi_kernels import _build

BIN = Path(sys.executable).parent


def test_prebuild_command_loads_every_op():
    env = dict(os.environ, ROI_KERNELS_CUDA="0")
    env["ROI_KERNELS_BUILD_DIR"] = str(_build.build_dir(False))
    proc = subprocess.run(
        [str(BIN / "roi-kernels-build")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "CPU only" in proc.stdout
    for op in ("roi_align", "roi_align_ragged", "multiscale_roi_align", "roi_pool"):
        assert op in proc.stdout


def test_failed_build_names_the_compiler_log(tmp_path):
    env = dict(os.environ, ROI_KERNELS_CUDA="0", ROI_KERNELS_BUILD_DIR=str(tmp_path / "build"), CXX="false")
    proc = subprocess.run(
        [str(BIN / "roi-kernels-build")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1
    log = tmp_path / "build" / "build.log"
    assert f"the compiler's log is {log}" in proc.stderr
    assert log.read_text().strip(), "the log holds the compiler's output"


def test_cuda_switch_is_validated(monkeypatch):
    monkeypatch.setenv("ROI_KERNELS_CUDA", "maybe")
    try:
        _build.cuda_sources_wanted()
    except ValueError as exc:
        assert "ROI_KERNELS_CUDA" in str(exc)
    else:
        raise AssertionError("an invalid ROI_KERNELS_CUDA must be rejected")
