"""The extension's build: the prebuild command (a real subprocess), its report, --clean, and a
failing build's error. tests/test_cuda_build.py compiles the CUDA sources."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import roi_kernels  # noqa: F401  (builds the extension into the session's cache folder first)
from roi_kernels import _build, build

BIN = Path(sys.executable).parent
OPS = {
    "roi_align",
    "roi_align_ragged",
    "multiscale_roi_align",
    "multiscale_roi_align_ragged",
    "roi_pool",
    "roi_pool_ragged",
    "ps_roi_align",
    "ps_roi_align_ragged",
    "ps_roi_pool",
    "ps_roi_pool_ragged",
    "roi_align_rotated",
    "roi_align_rotated_ragged",
}
OPS |= {f"{op}_backward" for op in OPS}  # each op's gradient (cpu/*_backward.cpp)


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


def _python(code: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_a_second_checkout_of_the_same_sources_loads_the_same_build(tmp_path):
    """Two checkouts (or installs) on one machine: the sources at another path, same content.
    The build folder is named by what the build depends on, and compiles a copy of the sources
    kept inside it, so the second checkout finds the first one's build up to date instead of
    recompiling it (as it did when the folder was named by torch's version alone and its
    build.ninja named the sources by absolute path)."""
    other = tmp_path / "checkout" / "csrc"
    shutil.copytree(Path(_build.__file__).parent / "csrc", other)
    env = dict(os.environ, ROI_KERNELS_CUDA="0", ROI_KERNELS_CSRC=str(other))
    env.pop("ROI_KERNELS_BUILD_DIR", None)
    proc = _python("import roi_kernels; from roi_kernels import _build; i = _build.load_info(); "
                   "print(i.directory, i.compiled, _build._CSRC)", env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    directory, compiled, csrc = proc.stdout.split()
    assert Path(csrc) == other
    assert Path(directory) == _build.loaded_build_dir() == _build.build_dir(False)
    assert compiled == "False", "the second checkout recompiled the kernels"


def test_changed_sources_or_flags_get_a_folder_of_their_own(tmp_path):
    other = tmp_path / "csrc"
    shutil.copytree(Path(_build.__file__).parent / "csrc", other)
    with open(other / "roi_math.h", "a") as f:
        f.write(f"\n// a local change {uuid.uuid4()}\n")
    base = dict(os.environ, ROI_KERNELS_CUDA="0")
    base.pop("ROI_KERNELS_BUILD_DIR", None)
    # _build.py alone, as roi-server asks it (importing the package would compile).
    code = (
        "import importlib.util as u, sys; s = u.spec_from_file_location('b', %r); b = u.module_from_spec(s); "
        "sys.modules['b'] = b; s.loader.exec_module(b); print(b.build_dir(False), b.is_built(False))" % _build.__file__
    )
    ours = _python(code, base).stdout.split()
    assert ours == [str(_build.build_dir(False)), "True"]
    changed = _python(code, dict(base, ROI_KERNELS_CSRC=str(other))).stdout.split()
    march = _python(code, dict(base, ROI_KERNELS_MARCH="x86-64-v2")).stdout.split()
    folders = {ours[0], changed[0], march[0]}
    assert len(folders) == 3, folders
    assert all(Path(f).parent == Path(ours[0]).parent for f in folders)
    assert changed[1] == "False", "nothing is built for these sources yet"


def test_no_cuda_runtime_warning_where_no_cuda_build_is_attempted():
    """torch.utils.cpp_extension warns at import when it finds a CUDA toolkit but no GPU; a
    CPU-only build must not print it (every server start and benchmark did)."""
    if _build.cuda_toolkit() is None or torch_cuda_version() is None:
        pytest.skip("no CUDA toolkit or a CPU-only torch: the warning cannot appear")
    env = dict(os.environ, ROI_KERNELS_CUDA="0", CUDA_HOME=str(_build.cuda_toolkit()))
    proc = _python("import roi_kernels", env)
    assert proc.returncode == 0, proc.stderr
    assert "No CUDA runtime" not in proc.stderr, proc.stderr
    # The warning is torch's own, and still shown where it is news: importing cpp_extension
    # directly, outside our loader, prints it (so the test above is not vacuous).
    proc = _python("import torch.utils.cpp_extension", env)
    if not torch_cuda_available():
        assert "No CUDA runtime is found" in proc.stderr, proc.stderr


def torch_cuda_version():
    import torch

    return torch.version.cuda


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_old_cache_folders_are_pruned(tmp_path, monkeypatch):
    """Each change of the sources or the flags makes a new cache folder; loading keeps the
    KEEP_BUILDS most recently used of a flavour and removes the rest (never the one loaded)."""
    prefix = f"torch{_build.torch.__version__.replace('+', '_')}-cpu-"
    folders = []
    for i in range(7):
        f = tmp_path / f"{prefix}{i:016x}"
        f.mkdir()
        os.utime(f, (1_000_000 + i, 1_000_000 + i))
        folders.append(f)
    other = tmp_path / f"torch0.0-cpu-{0:016x}"  # another torch version: not ours to prune
    other.mkdir()
    current = folders[0]  # the oldest, but the one being loaded
    _build._prune_cache(current, "cpu")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([current.name, other.name] + [f.name for f in folders[-(_build.KEEP_BUILDS - 1):]])
