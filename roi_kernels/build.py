"""``roi-kernels-build``: compile the extension ahead of time (for container images).

    roi-kernels-build            # build into the cache folder and check that it loads
    roi-kernels-build --clean    # remove the cache folder first
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="roi-kernels-build", description=__doc__.splitlines()[0])
    parser.add_argument("--clean", action="store_true", help="remove the cache folder first")
    parser.add_argument("--verbose", action="store_true", help="print the compiler's commands")
    args = parser.parse_args(argv)

    from roi_kernels import _build

    with_cuda = _build.cuda_sources_wanted()
    if args.clean:
        print(f"removing {_build.clean(with_cuda)}", flush=True)
    print(
        f"building roi_kernels ({'CPU + CUDA' if with_cuda else 'CPU only'}) "
        f"into {_build.build_dir(with_cuda)} ...",
        flush=True,
    )
    start = time.perf_counter()
    try:
        _build.load(verbose=args.verbose)
    except _build.BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import torch

    import roi_kernels  # noqa: F401  (registers the fake implementations)

    names = sorted(
        {n for n in torch._C._dispatch_get_registrations_for_dispatch_key("") if n.startswith("roi_kernels::")}
    )
    print(f"built in {time.perf_counter() - start:.1f} s")
    for key in ("CPU", "CUDA") if with_cuda else ("CPU",):
        ops = [n.split("::")[1] for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, key)]
        print(f"{key} kernels: {', '.join(ops) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
