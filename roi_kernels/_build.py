"""Builds and loads the C++/CUDA extension with ``torch.utils.cpp_extension``.

The extension is compiled on first import into a cache folder and reused afterwards (ninja
rebuilds it only when a source changes). Environment variables:

``ROI_KERNELS_BUILD_DIR``
    Build folder. Default: ``~/.cache/roi_kernels/<torch version>-<cpu|cuda>-<key>``, the key
    being a hash of everything the build depends on (the sources' content, the compiler flags,
    torch's version and CUDA version, the GPU architectures), so that two checkouts or two
    installed versions on one machine each keep their own build instead of rebuilding each
    other's. The sources are compiled from a copy inside the folder (``src/``), so the build
    does not depend on where the package is installed either.
``ROI_KERNELS_CUDA``
    ``auto`` (default): include the CUDA sources when nvcc and a CUDA build of torch are
    present and there is something to compile for (a visible GPU or ``TORCH_CUDA_ARCH_LIST``);
    ``1``: require them; ``0``: CPU only.
``ROI_KERNELS_MARCH``
    ``-march`` for the CPU sources (default ``native``; use e.g. ``x86-64-v3`` when building
    an image that runs on other machines).
``TORCH_CUDA_ARCH_LIST``
    The GPU architectures to compile for, as everywhere in PyTorch.
``ROI_KERNELS_NVCC_FLAGS``
    Extra nvcc flags, space-separated (e.g. ``--resource-usage``).
``ROI_KERNELS_CSRC``
    The C++/CUDA source folder to build (default: the package's ``csrc/``); for trying
    modified kernels without touching the installed package (scripts/mutate_cuda_kernels.py).
``ROI_KERNELS_VERBOSE``
    ``1`` prints the compiler's commands and output.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

_CSRC = Path(os.environ.get("ROI_KERNELS_CSRC") or Path(__file__).resolve().parent / "csrc")
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


def _flavour(with_cuda: bool) -> str:
    return "cuda" if with_cuda else "cpu"


# What each flavour compiles, relative to csrc/. "cuda-emulated" is the test-only build in which
# the CUDA kernels (cuda/*.cu, compiled by the host compiler) run through the CPU executor
# (emulator/executor.h) on CPU tensors, as ops of torch.ops.roi_kernels_emulated.
def _relative_sources(flavour: str) -> list[str]:
    if flavour == "cuda-emulated":
        return [str(f.relative_to(_CSRC)) for f in sorted((_CSRC / "emulator").glob("*.cpp"))]
    files = [_CSRC / "register.cpp", *sorted((_CSRC / "cpu").glob("*.cpp"))]
    if flavour == "cuda":
        files += sorted((_CSRC / "cuda").glob("*.cu"))
    return [str(f.relative_to(_CSRC)) for f in files]


def sources(with_cuda: bool) -> list[str]:
    """The files compiled (the originals in the package; the build compiles copies of them)."""
    return [str(_CSRC / f) for f in _relative_sources(_flavour(with_cuda))]


def _source_tree() -> dict[str, bytes]:
    """Every file under csrc/ (sources and headers) by relative path: what a build depends on."""
    tree = {}
    for f in sorted(_CSRC.rglob("*")):
        if f.is_file() and f.suffix in (".h", ".cuh", ".cpp", ".cu"):
            tree[f.relative_to(_CSRC).as_posix()] = f.read_bytes()
    return tree


_CUDA_FLAGS = ["-O3", "-lineinfo", "--fmad=false"]


def _cuda_flags() -> list[str]:
    # No --use_fast_math and no fused multiply-adds: the GPU must round the sample geometry,
    # weights and level assignment exactly as the CPU does. ROI_KERNELS_NVCC_FLAGS adds flags
    # (e.g. --resource-usage, which scripts/cuda_resources.py reads).
    return _CUDA_FLAGS + os.environ.get("ROI_KERNELS_NVCC_FLAGS", "").split()


def _emulated_flags() -> list[str]:
    return [f for f in _cpu_flags() if f != "-O3"] + ["-O2", "-pthread", "-DROI_KERNELS_CUDA_EMULATED"]


def build_key(flavour: str) -> str:
    """A hash of everything a build of ``flavour`` depends on: the sources' and headers'
    content, the compiler flags and compilers named by the environment, torch's version and
    its CUDA version, and for CUDA builds the architectures and the toolkit."""
    h = hashlib.sha256()

    def add(*parts: object) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)

    add(flavour, torch.__version__, torch.version.cuda or "none", EXTENSION_NAME)
    add(*_cpu_flags(), os.environ.get("CXX", ""), os.environ.get("CC", ""))
    if flavour == "cuda":
        add(*_cuda_flags(), os.environ.get("TORCH_CUDA_ARCH_LIST", ""), str(cuda_toolkit()))
    if flavour == "cuda-emulated":
        add(*_emulated_flags())
    for name, data in _source_tree().items():
        add(name, data)
    return h.hexdigest()[:16]


def build_dir(with_cuda: bool, flavour: str | None = None) -> Path:
    """The build folder: ``ROI_KERNELS_BUILD_DIR`` as given (the emulated build in its
    ``cuda-emulated/`` subfolder), else a cache folder named by :func:`build_key`."""
    flavour = flavour or _flavour(with_cuda)
    override = os.environ.get("ROI_KERNELS_BUILD_DIR")
    if override:
        path = Path(override).expanduser()
        if flavour == "cuda-emulated":
            path = path / "cuda-emulated"
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        path = cache / "roi_kernels" / f"{_cache_prefix(flavour)}{build_key(flavour)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cache_prefix(flavour: str) -> str:
    """The cache folder's name before its key: torch's version and the flavour."""
    return f"torch{torch.__version__.replace('+', '_')}-{flavour}-"


def _stage_sources(directory: Path) -> Path:
    """Mirror csrc/ into ``directory/src``, rewriting only the files whose bytes differ (so
    that ninja, which compares times, rebuilds only what changed) and removing files that are
    gone. The build compiles this copy: its paths are the same wherever the package lives."""
    src = directory / "src"
    tree = _source_tree()
    for name, data in tree.items():
        target = src / name
        if not target.exists() or target.read_bytes() != data:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
    if src.exists():
        for f in src.rglob("*"):
            if f.is_file() and f.relative_to(src).as_posix() not in tree:
                f.unlink()
    return src


def is_built(with_cuda: bool | None = None, flavour: str | None = None) -> bool:
    """True when loading the extension would only load it: the build folder holds a library
    compiled from sources identical to the package's (nothing for ninja to redo)."""
    if flavour is None:
        flavour = _flavour(cuda_sources_wanted() if with_cuda is None else with_cuda)
    directory = build_dir(flavour == "cuda", flavour)
    library = _library_path(directory, flavour)
    if not library.exists():
        return False
    built = library.stat().st_mtime_ns
    src = directory / "src"
    for name, data in _source_tree().items():
        staged = src / name
        if not staged.exists() or staged.stat().st_mtime_ns > built or staged.read_bytes() != data:
            return False
    return True


def _cpu_flags() -> list[str]:
    march = os.environ.get("ROI_KERNELS_MARCH", "native").strip()
    # torch adds its own -std (C++20 for torch 2.14). No contraction of a*b+c into fused
    # multiply-adds: the sample geometry must round exactly as torchvision's does.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if march:
        flags.append(f"-march={march}")
    return flags


class _DropNoCudaRuntimeWarning(logging.Filter):
    """torch.utils.cpp_extension warns at import that it found a toolkit but no GPU; that is
    only news when CUDA sources are about to be compiled."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _import_cpp_extension(with_cuda: bool):
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _DropNoCudaRuntimeWarning()
    if not with_cuda:
        logger.addFilter(quiet)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.removeFilter(quiet)
    return cpp_extension


def load(verbose: bool | None = None) -> None:
    """Compile (when needed) and load the extension; registers ``torch.ops.roi_kernels``."""
    with _LOCK:
        if "ext" in _LOADED:
            return
        with_cuda = cuda_sources_wanted()
        flavour = _flavour(with_cuda)
        info = _compile_and_load(flavour, verbose)
        _LOADED["ext"] = info.directory
        _LOADED["info"] = info


def load_emulated(verbose: bool | None = None) -> LoadInfo:
    """Build (when needed) and load the test-only library in which the CUDA kernels run on CPU
    tensors through the CPU executor: ``torch.ops.roi_kernels_emulated``. Never loaded by the
    server or by ``import roi_kernels``."""
    with _LOCK:
        if "emulated" not in _LOADED:
            _LOADED["emulated"] = _compile_and_load("cuda-emulated", verbose)
        return _LOADED["emulated"]  # type: ignore[return-value]


def _compile_and_load(flavour: str, verbose: bool | None) -> LoadInfo:
    with_cuda = flavour == "cuda"
    cpp_extension = _import_cpp_extension(with_cuda)
    if verbose is None:
        verbose = os.environ.get("ROI_KERNELS_VERBOSE", "0") == "1"
    directory = build_dir(with_cuda, flavour)
    fresh = not (directory / "build.ninja").exists()
    library = _library_path(directory, flavour)
    before = library.stat().st_mtime_ns if library.exists() else None
    start = time.perf_counter()
    src = _stage_sources(directory)
    if with_cuda:
        # torch guesses the toolkit from nvcc's path once, at import, and takes a wrapper in
        # /usr/local/bin for a toolkit in /usr/local; point it at the real one.
        home = str(cuda_toolkit())
        cpp_extension.CUDA_HOME = home
        os.environ["CUDA_HOME"] = home
    if flavour == "cuda-emulated":
        cflags = _emulated_flags()
    else:
        cflags = _cpu_flags() + (["-DROI_KERNELS_WITH_CUDA"] if with_cuda else [])
    try:
        cpp_extension.load(
            name=library.stem,
            sources=[str(src / f) for f in _relative_sources(flavour)],
            extra_include_paths=[str(src)],
            extra_cflags=cflags,
            extra_cuda_cflags=_cuda_flags(),
            extra_ldflags=["-fopenmp"] + (["-pthread"] if flavour == "cuda-emulated" else []),
            build_directory=str(directory),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # the compiler's output is in the exception text
        log = directory / "build.log"
        log.write_text(f"{exc}\n\n{traceback.format_exc()}")
        raise BuildError(
            f"building the roi_kernels extension ({flavour}) failed; the compiler's log is {log} "
            f"(build folder {directory}; set ROI_KERNELS_VERBOSE=1 to see the commands)"
        ) from None
    seconds = time.perf_counter() - start
    (directory / "build.log").unlink(missing_ok=True)  # a log of an earlier failure
    after = library.stat().st_mtime_ns if library.exists() else None
    if not os.environ.get("ROI_KERNELS_BUILD_DIR"):
        _prune_cache(directory, flavour)
    return LoadInfo(directory, with_cuda, seconds, fresh, compiled=after != before)


KEEP_BUILDS = 4  # cache folders kept per flavour: the ones of the last few sources and versions


def _prune_cache(current: Path, flavour: str) -> None:
    """Removes the least recently used cache folders of this flavour beyond KEEP_BUILDS (each
    source change or upgrade makes a new one); never the one just loaded. A folder's use is the
    time its library was last loaded (the folder's mtime, touched here)."""
    try:
        os.utime(current)
        prefix = _cache_prefix(flavour)
        siblings = [p for p in current.parent.iterdir() if p.is_dir() and p.name.startswith(prefix) and p != current]
        siblings = [p for p in siblings if len(p.name) == len(prefix) + 16]  # ours: a 16-digit key
        siblings.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in siblings[KEEP_BUILDS - 1 :]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass  # a cache that cannot be pruned is no reason to fail a load


def _library_path(directory: Path, flavour: str) -> Path:
    suffix = {"cpu": "_cpu", "cuda": "_cuda", "cuda-emulated": "_cuda_emulated"}[flavour]
    return directory / f"{EXTENSION_NAME}{suffix}.so"


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
