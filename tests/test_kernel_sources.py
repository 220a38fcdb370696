"""Source checks of what the CPU executor cannot see: the device's math library.

A call such as ``::cos(x)`` with a float ``x`` is C's double cos under g++ but CUDA's cosf
under nvcc's device pass (roi_math.h, section 0). The shared math and the CUDA kernels must
call the math library only through ``math::fn``, whose functions take and return double and
static_assert the overload they resolve to in every compile of the header (nvcc's device pass
included: tests/test_cuda_build.py compiles it). These tests fail on any other call.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "roi_kernels" / "csrc"
SHARED = [CSRC / "roi_math.h", *sorted((CSRC / "cuda").glob("*.cuh"))]

FUNCTIONS = (
    "cos sin tan acos asin atan atan2 cosh sinh tanh exp exp2 expm1 log log2 log10 log1p pow sqrt "
    "rsqrt cbrt hypot floor ceil round trunc rint nearbyint lround llround fabs fmod remainder fma "
    "fmin fmax erf erfc lgamma tgamma"
).split()
CALL = re.compile(r"(?<![\w.])((?:::|std::|fn::|math::fn::)?)(" + "|".join(FUNCTIONS) + r")f?\s*\(")


def code_lines(path: Path):
    """(line number, code) with comments and string literals removed."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m[0].count("\n"), text, flags=re.S)
    for n, raw in enumerate(text.splitlines(), 1):
        yield n, re.sub(r'"(?:\\.|[^"\\])*"', '""', raw.split("//")[0]), raw


def raw_math_calls(path: Path) -> list[str]:
    found = []
    in_fn = False
    for n, line, raw in code_lines(path):
        if re.match(r"\s*namespace fn \{", line):
            in_fn = True
        elif in_fn and raw.strip() == "}  // namespace fn":
            in_fn = False
        if in_fn:
            continue  # the wrappers themselves
        for m in CALL.finditer(line):
            if m[1] in ("fn::", "math::fn::"):
                continue
            found.append(f"{path.name}:{n}: {line.strip()}")
    return found


@pytest.mark.parametrize("path", SHARED, ids=lambda p: p.name)
def test_the_math_library_is_called_only_through_math_fn(path):
    assert raw_math_calls(path) == []


def test_the_check_finds_a_raw_call(tmp_path):
    """The scan itself bites: a float cos written directly is found; comments are not."""
    planted = tmp_path / "k.cuh"
    planted.write_text(
        "// ::cos(x) in a comment is fine\n"
        "T c = ::cos(theta);\n"
        "T s = static_cast<T>(fn::sin(static_cast<double>(theta)));\n"
        "T l = std::log2f(v);\n"
        "T r = sqrt(v);\n"
    )
    assert [f.split(":")[1] for f in raw_math_calls(planted)] == ["2", "4", "5"]


def test_math_fn_covers_every_function_the_shared_math_calls():
    text = (CSRC / "roi_math.h").read_text()
    used = set(re.findall(r"\bfn::(\w+)\(", text))
    defined = set(re.findall(r"ROI_MATH_DOUBLE_FN\((\w+)\)", text)) - {"name"}
    assert used and used <= defined, used - defined
    for name in defined:
        assert f"double {name}(T) = delete;" in text, f"fn::{name} accepts a float silently"
