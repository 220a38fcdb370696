"""``roi-kernels-build``: compile the extension ahead of time (for container images).

    roi-kernels-build            # build into the cache folder (or check it) and list the kernels
    roi-kernels-build --clean    # compile every source afresh, whatever the cache folder holds

Importing ``roi_kernels`` compiles the extension, and this command is part of that package, so
the compilation has run (or the cached build has been loaded) by the time the command starts:
it reports what that import did, honestly timed (``roi_kernels._build.load_info``). The switches
are the environment variables of ``roi_kernels._build`` (``ROI_KERNELS_BUILD_DIR``,
``ROI_KERNELS_CUDA``, ``TORCH_CUDA_ARCH_LIST``, ``ROI_KERNELS_VERBOSE=1`` for the compiler's
commands, ...). A failed build stops the import with ``roi_kernels.BuildError``, which names
the compiler's log (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys


def registered_kernels(device: str) -> list[str]:
    """The roi_kernels ops with a kernel for ``device`` (``CPU`` or ``CUDA``)."""
    import torch

    registered = torch._C._dispatch_get_registrations_for_dispatch_key("")
    names = sorted({n for n in registered if n.startswith("roi_kernels::")})
    return [n.split("::")[1] for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, device)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="roi-kernels-build",
        description="Compile the roi_kernels extension ahead of time and list the kernels it registers.",
        epilog="Settings are environment variables: ROI_KERNELS_BUILD_DIR, ROI_KERNELS_CUDA, "
        "TORCH_CUDA_ARCH_LIST, ROI_KERNELS_MARCH, ROI_KERNELS_VERBOSE=1 (see the README).",
    )
    parser.add_argument(
        "--clean", action="store_true", help="compile every source afresh (removes an earlier build first)"
    )
    args = parser.parse_args(argv)

    import roi_kernels  # noqa: F401  (already imported: it compiled or loaded the extension)
    from roi_kernels import _build

    info = _build.load_info()
    assert info is not None, "importing roi_kernels loads the extension"
    flavour = "CPU + CUDA" if info.with_cuda else "CPU only"
    if args.clean and not info.fresh:
        # The import above found an earlier build; compile again from nothing in a fresh
        # process (this one has the library loaded), with the same flavour and folder.
        print(f"removing {info.directory} (an earlier build) ...", flush=True)
        shutil.rmtree(info.directory, ignore_errors=True)
        env = dict(os.environ, ROI_KERNELS_CUDA="1" if info.with_cuda else "0")
        env["ROI_KERNELS_BUILD_DIR"] = str(info.directory)
        return subprocess.call([sys.executable, "-m", "roi_kernels.build"], env=env)

    if info.fresh:
        what = f"compiled roi_kernels ({flavour}) into {info.directory} in {info.seconds:.1f} s"
    elif info.compiled:
        what = (
            f"recompiled the changed sources of roi_kernels ({flavour}) in {info.directory} "
            f"in {info.seconds:.1f} s"
        )
    else:
        what = (
            f"the build of roi_kernels ({flavour}) in {info.directory} is up to date "
            f"(loaded in {info.seconds:.2f} s)"
        )
    print(what)
    for device in ("CPU", "CUDA") if info.with_cuda else ("CPU",):
        print(f"{device} kernels: {', '.join(registered_kernels(device)) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
