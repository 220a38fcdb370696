"""Mutation testing of the CUDA kernels: do the executor's tests catch a one-line defect?

Plants one defect at a time in a copy of the CUDA kernel headers (roi_kernels/csrc/cuda/*.cuh):
an index or bound off by one (``<`` to ``<=``, ``+ 1`` to ``+ 2``, ``threadIdx.x`` to
``threadIdx.x + 1``, ...), a comparison flipped (``<`` to ``>``), a barrier removed; then runs
the cuda_emulated tests against it: tests/test_cuda_emulated.py (bit for bit against the CPU
kernels), and for a mutant that passes them the sanitizer programs (AddressSanitizer +
UndefinedBehaviorSanitizer, then ThreadSanitizer). A mutant is killed when any of them fails.
Mutants that do not compile are left out of the score.

    python scripts/mutate_cuda_kernels.py --count 40 --seed 1

Each mutant costs a rebuild of one op's emulated library (~30 s on two cores) plus the tests
(seconds for a killed mutant, a few minutes for a survivor): plan ~1-2 minutes a mutant.
Writes a table to stdout and JSON to benchmarks/out/mutants.json (--out). Progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "roi_kernels" / "csrc" / "cuda"

# (kind, pattern, replacement): applied to one match on one code line.
OPERATORS = [
    # Comparisons are written with spaces around them; a "<" without is a template bracket.
    ("boundary", r" < ", " <= "),
    ("boundary", r" <= ", " < "),
    ("boundary", r" > ", " >= "),
    ("boundary", r" >= ", " > "),
    ("flipped", r" < ", " > "),
    ("flipped", r" > ", " < "),
    ("flipped", r" == ", " != "),
    ("flipped", r" != ", " == "),
    ("index", r"\+ 1\b", "+ 2"),
    ("index", r"- 1\b", "- 2"),
    ("index", r"\bthreadIdx\.x\b", "(threadIdx.x + 1)"),
    ("index", r"\bblockIdx\.x\b", "(blockIdx.x + 1)"),
    ("index", r"\* gw\b", "* gh"),
    ("index", r"\* gh\b", "* gw"),
    ("index", r"\bkTileBins \+ 1\b", "kTileBins"),
    ("index", r"\* 5\b", "* 6"),
    ("index", r"\* 6\b", "* 5"),
    ("swapped", r"\bpooled_width\b", "pooled_height"),
    ("swapped", r"\bpooled_height\b", "pooled_width"),
    ("swapped", r"\bstride_h\b", "stride_w"),
    ("swapped", r"\bstride_w\b", "stride_h"),
]


@dataclass
class Mutant:
    file: str
    line: int
    kind: str
    before: str
    after: str
    outcome: str = ""  # killed-by-tests, killed-by-asan, killed-by-tsan, survived, does-not-compile
    seconds: float = 0.0
    detail: str = ""


def is_code(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith(("//", "#", "*")) and "static_assert" not in s


def candidates() -> list[Mutant]:
    out = []
    for path in sorted(KERNELS.glob("*.cuh")):
        if path.name == "device.cuh":
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not is_code(line):
                continue
            code = line.split("//")[0]
            if "template <" in code or "#include" in code:
                continue
            if code.strip() == "__syncthreads();" or code.strip().startswith("__syncthreads();"):
                out.append(Mutant(path.name, i + 1, "barrier removed", line, line.replace("__syncthreads();", ";", 1)))
                continue
            if code.rstrip().endswith(",") and "(" not in code and "=" not in code:
                continue  # a parameter's declaration
            for kind, pattern, repl in OPERATORS:
                for m in re.finditer(pattern, code):
                    mutated = code[: m.start()] + repl + code[m.end() :]
                    if "__launch_bounds__" in code or "constexpr" in code:
                        continue
                    out.append(Mutant(path.name, i + 1, kind, line, mutated + line[len(code) :]))
    return out


def run(cmd, env, timeout, cwd=ROOT):
    try:
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, 124, exc.stdout or "", exc.stderr or "")


def sanitizer_program(csrc: Path, work: Path, sanitizer: str) -> tuple[bool, str]:
    """Builds and runs tests/emulated/sanitize_kernels.cpp against the mutated headers."""
    import torch

    flags = {"asan": ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"],
             "tsan": ["-fsanitize=thread"]}[sanitizer]  # fmt: skip
    exe = work / f"sanitize-{sanitizer}"
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-g", "-pthread", "-ffp-contract=off", *flags,
           "-DROI_KERNELS_CUDA_EMULATED", f"-I{csrc}",
           f"-I{Path(torch.__file__).parent / 'include'}", str(ROOT / "tests" / "emulated" / "sanitize_kernels.cpp"),
           "-o", str(exe)]  # fmt: skip
    proc = run(cmd, dict(os.environ), 600)
    if proc.returncode != 0:
        return False, "compile failed"
    env = dict(os.environ, ASAN_OPTIONS="halt_on_error=1:detect_leaks=0", TSAN_OPTIONS="halt_on_error=1:exitcode=66")
    proc = run([str(exe), "quick"], env, 900)
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if "Sanitizer" in ln or "runtime error" in ln), "")
        return True, first.strip()[:200] or f"exit {proc.returncode}"
    return False, ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=40, help="mutants to try (sampled; barrier removals always)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "mutants.json")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--retry", type=Path, help="try again the mutants that survived in this earlier JSON output")
    args = parser.parse_args(argv)

    every = candidates()
    if args.retry:
        earlier = json.loads(args.retry.read_text())["mutants"]
        chosen = [Mutant(**{**m, "outcome": "", "detail": "", "seconds": 0.0}) for m in earlier if m["outcome"] == "survived"]
    else:
        rng = random.Random(args.seed)
        barriers = [m for m in every if m.kind == "barrier removed"]
        others = [m for m in every if m.kind != "barrier removed"]
        chosen = barriers + rng.sample(others, max(0, min(len(others), args.count - len(barriers))))
    print(f"{len(every)} candidate mutants in {KERNELS}; trying {len(chosen)}", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="roi-mutants-"))
    csrc = work / "csrc"
    shutil.copytree(ROOT / "roi_kernels" / "csrc", csrc)
    env = dict(os.environ, ROI_KERNELS_CSRC=str(csrc), ROI_KERNELS_BUILD_DIR=str(work / "build"), ROI_KERNELS_CUDA="0")
    test = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "cuda_emulated",
            "tests/test_cuda_emulated.py"]  # fmt: skip

    # The unmutated copy must pass (and builds the libraries once).
    check = run([*test, "-k", "ragged"], env, 1800)
    assert check.returncode == 0, f"the unmutated kernels fail their tests:\n{check.stdout[-3000:]}"
    probe = run([sys.executable, "-c", "from roi_kernels import _build; print(_build._CSRC)"], env, 300)
    assert probe.stdout.strip() == str(csrc), f"the tests do not build the copy: {probe.stdout}"

    for n, m in enumerate(chosen, 1):
        target = csrc / "cuda" / m.file
        original = (KERNELS / m.file).read_text()
        lines = original.splitlines(keepends=True)
        assert lines[m.line - 1].rstrip("\n") == m.before
        lines[m.line - 1] = m.after + "\n"
        target.write_text("".join(lines))
        start = time.perf_counter()
        proc = run(test, env, 1800)
        out = proc.stdout + proc.stderr
        if "BuildError" in out or "building the roi_kernels extension" in out:
            m.outcome = "does-not-compile"
        elif proc.returncode != 0:
            m.outcome = "killed-by-tests"
            failed = re.search(r"^FAILED (\S+)", out, re.M)
            m.detail = failed[1] if failed else f"exit {proc.returncode}"
        else:
            for sanitizer in ("asan", "tsan"):
                killed, why = sanitizer_program(csrc, work, sanitizer)
                if killed:
                    m.outcome, m.detail = f"killed-by-{sanitizer}", why
                    break
            else:
                m.outcome = "survived"
        m.seconds = round(time.perf_counter() - start, 1)
        target.write_text(original)
        print(f"[{n}/{len(chosen)}] {m.outcome:17} {m.file}:{m.line} {m.kind}: {m.after.strip()[:90]} ({m.seconds} s)",
              file=sys.stderr, flush=True)  # fmt: skip

    scored = [m for m in chosen if m.outcome != "does-not-compile"]
    killed = [m for m in scored if m.outcome.startswith("killed")]
    print(f"\n{len(killed)} of {len(scored)} compiling mutants killed ({100 * len(killed) / max(1, len(scored)):.0f} %); "
          f"{len(chosen) - len(scored)} did not compile\n")  # fmt: skip
    print("| kind | tried | killed by tests | by ASan/UBSan | by TSan | survived |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in sorted({m.kind for m in scored}):
        ms = [m for m in scored if m.kind == kind]
        count = lambda o: sum(m.outcome == o for m in ms)  # noqa: E731
        print(f"| {kind} | {len(ms)} | {count('killed-by-tests')} | {count('killed-by-asan')} | "
              f"{count('killed-by-tsan')} | {count('survived')} |")  # fmt: skip
    for m in scored:
        if m.outcome == "survived":
            print(f"\nsurvived: {m.file}:{m.line} ({m.kind})\n  - {m.before.strip()}\n  + {m.after.strip()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seed": args.seed, "mutants": [asdict(m) for m in chosen]}, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
