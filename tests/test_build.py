"""The extension's build: the prebuild command (a real subprocess), its report, --clean, and a
failing build's error. tests/test_cuda_build.py compiles the CUDA sources."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import roi_kernels  # noqa: F401  (builds the extension into the session's cache folder first)
from roi_kernels import _build, build

BIN = Path(sys.executable).parent
OPS = {
    "roi_align",
    "roi_align_ragged",
    "multiscale_roi_align",
    "roi_pool",
    "ps_roi_align",
    "ps_roi_pool",
    "roi_align_rotated",
}


def run_build(env, *args):
    return subprocess.run(
        [str(BIN / "roi-kernels-build"), *args], env=env, capture_output=True, text=True, timeout=900
    )


def test_prebuild_command_reports_the_cached_build_and_every_op():
    env = dict(os.environ, ROI_KERNELS_CUDA="0")
    env["ROI_KERNELS_BUILD_DIR"] = str(_build.build_dir(False))
    proc = run_build(env)
    assert proc.returncode == 0, proc.stderr
    # The session's import compiled this folder already: the command must say it only loaded
    # it, and time the load (not a compile it did not do).
    m = re.search(r"the build of roi_kernels \(CPU only\) in (\S+) is up to date \(loaded in ([0-9.]+) s\)", proc.stdout)
    assert m, proc.stdout
    assert Path(m[1]) == _build.build_dir(False)
    cpu = re.search(r"^CPU kernels: (.*)$", proc.stdout, re.M)
    assert cpu and set(cpu[1].split(", ")) == OPS
    assert "CUDA kernels" not in proc.stdout


def test_load_info_times_the_import():
    info = _build.load_info()
    assert info is not None and info.directory == _build.loaded_build_dir()
    assert info.seconds > 0
    assert set(build.registered_kernels("CPU")) == OPS


def test_failed_build_names_the_compiler_log(tmp_path):
    env = dict(os.environ, ROI_KERNELS_CUDA="0", ROI_KERNELS_BUILD_DIR=str(tmp_path / "build"), CXX="false")
    proc = run_build(env)
    assert proc.returncode == 1
    log = tmp_path / "build" / "build.log"
    assert f"the compiler's log is {log}" in proc.stderr
    assert log.read_text().strip(), "the log holds the compiler's output"


def test_clean_removes_an_earlier_build_and_compiles_again(tmp_path, monkeypatch, capsys):
    """--clean after an import that found an earlier build: the folder goes, and a fresh process
    compiles it again with the same flavour and folder (this process has the library loaded).
    The fresh-folder case (nothing to remove) runs for real in tests/test_cuda_build.py."""
    folder = tmp_path / "build"
    shutil.copytree(_build.loaded_build_dir(), folder)
    info = _build.LoadInfo(folder, with_cuda=False, seconds=0.1, fresh=False, compiled=False)
    monkeypatch.setattr(_build, "load_info", lambda: info)
    calls = []

    def fake_call(cmd, env):
        calls.append((cmd, env))
        assert not folder.exists(), "the earlier build is gone before the fresh compile starts"
        return 0

    monkeypatch.setattr(build.subprocess, "call", fake_call)
    assert build.main(["--clean"]) == 0
    assert f"removing {folder}" in capsys.readouterr().out
    [(cmd, env)] = calls
    assert cmd == [sys.executable, "-m", "roi_kernels.build"]
    assert env["ROI_KERNELS_CUDA"] == "0" and env["ROI_KERNELS_BUILD_DIR"] == str(folder)


def test_help_documents_the_options():
    proc = subprocess.run([str(BIN / "roi-kernels-build"), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert "--clean" in proc.stdout and "ROI_KERNELS_BUILD_DIR" in proc.stdout


def test_cuda_switch_is_validated(monkeypatch):
    monkeypatch.setenv("ROI_KERNELS_CUDA", "maybe")
    with pytest.raises(ValueError, match="ROI_KERNELS_CUDA"):
        _build.cuda_sources_wanted()
