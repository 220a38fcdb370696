"""Builds and loads the C++/CUDA extension with ``torch.utils.cpp_extension``.

The extension is compiled on first import into a cache folder and reused afterwards (ninja
rebuilds it only when a source changes). Environment variables:

``ROI_KERNELS_BUILD_DIR``
    Cache folder (default ``~/.cache/roi_kernels/<torch version>-<cpu|cuda>``).
``ROI_KERNELS_CUDA``
    ``auto`` (default): include the CUDA sources when nvcc and a CUDA build of torch are
    present and there is something to compile for (a visible GPU or ``TORCH_CUDA_ARCH_LIST``);
    ``1``: require them; ``0``: CPU only.
``ROI_KERNELS_MARCH``
    ``-march`` for the CPU sources (default ``native``; use e.g. ``x86-64-v3`` when building
    an image that runs on other machines).
``TORCH_CUDA_ARCH_LIST``
    The GPU architectures to compile for, as everywhere in PyTorch.
``ROI_KERNELS_VERBOSE``
    ``1`` prints the compiler's commands and output.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent / "csrc"
_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}

EXTENSION_NAME = "roi_kernels_ext"


class BuildError(RuntimeError):
    """The extension failed to compile; the message names the compiler's log file."""


@dataclass(frozen=True)
class LoadInfo:
    """What :func:`load` did (the first import of ``roi_kernels`` calls it)."""

    directory: Path  # the build folder
    with_cuda: bool  # the CUDA sources are part of the build
    seconds: float  # wall time of compiling what was stale, linking and loading
    fresh: bool  # the folder held no earlier build: every source was compiled
    compiled: bool  # something was compiled (the library was written anew)


def _env_flag(name: str, default: str = "auto") -> str:
    value = os.environ.get(name, default).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "1"
    if value in ("0", "false", "no", "off"):
        return "0"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"{name} must be auto, 1 or 0, got {value!r}")


def cuda_toolkit() -> Path | None:
    """The CUDA toolkit to compile with: ``CUDA_HOME`` (or ``CUDA_PATH``) when set, else the one
    whose nvcc is on ``PATH`` (through symlinks and wrapper scripts' targets), else
    ``/usr/local/cuda``. None unless it has both nvcc and the runtime headers."""
    candidates = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if not candidates:
        nvcc = shutil.which("nvcc")
        if nvcc:
            candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
            candidates += _wrapped_toolkits(Path(nvcc))
        candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


def _wrapped_toolkits(nvcc: Path) -> list[Path]:
    """Toolkits named by an nvcc that is a small wrapper script (``exec /opt/cuda/bin/nvcc``)."""
    try:
        if nvcc.stat().st_size > 4096:
            return []
        words = nvcc.read_text(errors="ignore").split()
    except OSError:
        return []
    return [Path(w).parent.parent for w in words if w.endswith("/bin/nvcc")]


def _nvcc_available() -> bool:
    return cuda_toolkit() is not None


def cuda_sources_wanted() -> bool:
    """Whether the build includes the CUDA kernels (see ``ROI_KERNELS_CUDA``)."""
    flag = _env_flag("ROI_KERNELS_CUDA")
    has_cuda_torch = torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1":
        if not has_cuda_torch:
            raise BuildError("ROI_KERNELS_CUDA=1 but this torch was built without CUDA")
        if not _nvcc_available():
            raise BuildError("ROI_KERNELS_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        if not _cuda_targets_known():
            raise BuildError(
                "ROI_KERNELS_CUDA=1 but no GPU is visible to pick architectures from: "
                "set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0')"
            )
        return True
    # Without a GPU and without TORCH_CUDA_ARCH_LIST there is nothing to compile for (nor to
    # run on): the CPU build is the useful one.
    return has_cuda_torch and _nvcc_available() and _cuda_targets_known()


def _cuda_targets_known() -> bool:
    return bool(os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()) or torch.cuda.is_available()


def sources(with_cuda: bool) -> list[str]:
    files = [_CSRC / "register.cpp", *sorted((_CSRC / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((_CSRC / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def build_dir(with_cuda: bool) -> Path:
    override = os.environ.get("ROI_KERNELS_BUILD_DIR")
    if override:
        path = Path(override).expanduser()
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        flavour = "cuda" if with_cuda else "cpu"
        path = cache / "roi_kernels" / f"torch{torch.__version__.replace('+', '_')}-{flavour}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_flags() -> list[str]:
    march = os.environ.get("ROI_KERNELS_MARCH", "native").strip()
    # torch adds its own -std (C++20 for torch 2.14). No contraction of a*b+c into fused
    # multiply-adds: the sample geometry must round exactly as torchvision's does.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if march:
        flags.append(f"-march={march}")
    return flags


def load(verbose: bool | None = None) -> None:
    """Compile (when needed) and load the extension; registers ``torch.ops.roi_kernels``."""
    with _LOCK:
        if "ext" in _LOADED:
            return
        from torch.utils import cpp_extension

        with_cuda = cuda_sources_wanted()
        if verbose is None:
            verbose = os.environ.get("ROI_KERNELS_VERBOSE", "0") == "1"
        directory = build_dir(with_cuda)
        fresh = not (directory / "build.ninja").exists()
        library = _library_path(directory, with_cuda)
        before = library.stat().st_mtime_ns if library.exists() else None
        start = time.perf_counter()
        # No --use_fast_math and no fused multiply-adds: the GPU must round the sample
        # geometry, weights and level assignment exactly as the CPU does.
        cuda_flags = ["-O3", "-lineinfo", "--fmad=false"]
        if with_cuda:
            # torch guesses the toolkit from nvcc's path once, at import, and takes a wrapper in
            # /usr/local/bin for a toolkit in /usr/local; point it at the real one.
            home = str(cuda_toolkit())
            cpp_extension.CUDA_HOME = home
            os.environ["CUDA_HOME"] = home
        try:
            cpp_extension.load(
                name=library.stem,
                sources=sources(with_cuda),
                extra_include_paths=[str(_CSRC)],
                extra_cflags=_cpu_flags() + (["-DROI_KERNELS_WITH_CUDA"] if with_cuda else []),
                extra_cuda_cflags=cuda_flags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:  # the compiler's output is in the exception text
            log = directory / "build.log"
            log.write_text(f"{exc}\n\n{traceback.format_exc()}")
            raise BuildError(
                f"building the roi_kernels extension failed; the compiler's log is {log} "
                f"(build folder {directory}; set ROI_KERNELS_VERBOSE=1 to see the commands)"
            ) from None
        seconds = time.perf_counter() - start
        (directory / "build.log").unlink(missing_ok=True)  # a log of an earlier failure
        after = library.stat().st_mtime_ns if library.exists() else None
        _LOADED["ext"] = directory
        _LOADED["info"] = LoadInfo(directory, with_cuda, seconds, fresh, compiled=after != before)


def _library_path(directory: Path, with_cuda: bool) -> Path:
    return directory / f"{EXTENSION_NAME}{'_cuda' if with_cuda else '_cpu'}.so"


def loaded_build_dir() -> Path | None:
    return _LOADED.get("ext")  # type: ignore[return-value]


def load_info() -> LoadInfo | None:
    """What loading the extension did in this process; None before it is loaded."""
    return _LOADED.get("info")  # type: ignore[return-value]


def clean(with_cuda: bool | None = None) -> Path:
    """Remove the build cache folder (forces a rebuild on next import)."""
    directory = build_dir(cuda_sources_wanted() if with_cuda is None else with_cuda)
    shutil.rmtree(directory, ignore_errors=True)
    return directory
