"""Starting ``roi-server`` as a newcomer and an operator do, with real subprocesses: a cold
start (the kernels compiled in a child process, logged, and ended at once by SIGTERM), ports
already in use, and a client-only install (no ``server`` extra)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from test_service_support import ROOT, in_process_server, roi_server_command


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROI_") or k.startswith("ROI_KERNELS")}
    env.update(extra)
    return env


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        found = re.search(pattern, text)
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"roi-server exited with {proc.returncode} before {pattern!r}:\n{text}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {pattern!r} in {timeout} s:\n{path.read_text(errors='replace')}")


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (the compilers of a build name its
    folder)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry.name}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != b"Z":
            found.append(cmdline)
    return found


def _start(tmp_path: Path, *args: str, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"roi-server-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(roi_server_command() + list(args), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    return proc, log


# ---------------------------------------------------------------------------------------------
# Cold start: the kernels are compiled in a child process


@pytest.fixture(scope="module")
def cold_build_dir(tmp_path_factory) -> Path:
    """An empty build folder: a server pointed at it compiles the kernels (CPU only)."""
    return tmp_path_factory.mktemp("cold-build")


def test_sigterm_during_a_cold_start_ends_the_compile_and_exits_at_once(tmp_path, cold_build_dir):
    env = _env(ROI_KERNELS_BUILD_DIR=str(cold_build_dir), ROI_KERNELS_CUDA="0")
    proc, log = _start(tmp_path, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", env=env)
    try:
        _wait_for(log, r"compiling the kernels into " + re.escape(str(cold_build_dir)), proc, timeout=120)
        # Give the compilers time to start: the stop must end them, not only the server.
        deadline = time.monotonic() + 60
        while not any("cc1plus" in c or "c++" in c for c in _processes_mentioning(str(cold_build_dir))):
            assert time.monotonic() < deadline, "no compiler ran for the cold start"
            time.sleep(0.1)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    print(f"exited {took:.2f} s after SIGTERM")
    assert code == 0, text
    # Measured 2.4-3.0 s on an idle two-core machine (most of it the interpreter's exit, as
    # for any stop); a compile that held the process took 29-72 s.
    assert took < 10, f"exited {took:.1f} s after SIGTERM:\n{text}"
    assert "stopped compiling the kernels" in text and text.rstrip().endswith("stopped"), text
    assert "Traceback" not in text
    time.sleep(0.5)
    assert _processes_mentioning(str(cold_build_dir)) == [], "compilers of the stopped build still run"


@pytest.mark.slow
def test_a_cold_start_says_it_compiles_where_and_how_long_and_the_next_start_only_loads(tmp_path, cold_build_dir):
    env = _env(ROI_KERNELS_BUILD_DIR=str(cold_build_dir), ROI_KERNELS_CUDA="0")
    args = ("--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1")
    proc, log = _start(tmp_path, *args, env=env)
    try:
        _wait_for(log, r"listening on 127\.0\.0\.1:\d+", proc, timeout=600)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    where = re.escape(str(cold_build_dir))
    assert re.search(r"compiling the kernels into " + where + r" \(first start only", text), text
    took = re.search(r"compiled the kernels in (\d+\.\d) s \(into " + where + r"\)", text)
    assert took and float(took.group(1)) > 1.0, text
    lines = text.splitlines()
    compiling = next(i for i, line in enumerate(lines) if "compiling the kernels" in line)
    compiled = next(i for i, line in enumerate(lines) if "compiled the kernels in" in line)
    listening = next(i for i, line in enumerate(lines) if "listening on" in line)
    assert compiling < compiled < listening
    assert "Traceback" not in text

    # Built: the next start loads it and says nothing of compiling.
    proc, log = _start(tmp_path, *args, env=env)
    try:
        _wait_for(log, r"listening on 127\.0\.0\.1:\d+", proc, timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "compil" not in log.read_text(), log.read_text()


def test_a_failed_compile_names_the_compilers_log_and_exits_1(tmp_path):
    build = tmp_path / "build"
    env = _env(ROI_KERNELS_BUILD_DIR=str(build), ROI_KERNELS_CUDA="0", CXX="/bin/false")
    run = subprocess.run(
        roi_server_command() + ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert "compiling the kernels failed" in output and str(build / "build.log") in output, output
    assert "Traceback" not in output


# ---------------------------------------------------------------------------------------------
# Ports in use


@pytest.fixture
def taken_port():
    """A port another process (this one) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "which, words",
    [
        ("grpc", ["gRPC port {port}", "--port", "ROI_PORT"]),
        ("metrics", ["metrics port {port}", "--metrics-port", "ROI_METRICS_PORT"]),
    ],
)
def test_a_port_in_use_is_named_with_its_flag(tmp_path, taken_port, which, words):
    ports = ["--port", str(taken_port), "--metrics-port", "0"] if which == "grpc" else ["--port", "0", "--metrics-port", str(taken_port)]
    run = subprocess.run(
        roi_server_command() + ["--host", "127.0.0.1", *ports], capture_output=True, text=True, env=_env(), timeout=120, cwd=tmp_path
    )
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    for w in words:
        assert w.format(port=taken_port) in output, output
    assert "already in use" in output
    assert "Traceback" not in output
    # gRPC's core logs a raw line of its own when it fails to bind ("E1201 ... chttp2 ...").
    assert not re.search(r"^[EW]\d{4} ", output, re.M), output


# ---------------------------------------------------------------------------------------------
# A client-only install: the client's dependencies (numpy, grpcio, protobuf) and the project's
# packages, without torch nor the server extra's other packages.


@pytest.fixture(scope="module")
def client_only_python(tmp_path_factory) -> Path:
    """A virtual environment holding only what ``pip install roi-service`` installs: numpy,
    grpcio (and typing_extensions), protobuf, and roi_client / roi_server / roi_kernels."""
    venv = tmp_path_factory.mktemp("client-only") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    here = Path(__import__("numpy").__file__).resolve().parents[1]
    for name in ("numpy", "numpy.libs", "grpc", "google", "typing_extensions.py"):
        if (here / name).exists():
            (site / name).symlink_to(here / name)
    for package in (ROOT / "client" / "roi_client", ROOT / "server" / "roi_server", ROOT / "roi_kernels"):
        (site / package.name).symlink_to(package)
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0, "the client-only environment must not see torch"
    return python


def _entry_points() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("command", ["roi-server", "roi-kernels-build"])
def test_server_commands_without_the_server_extra_name_it_and_exit_2(client_only_python, command):
    module, _, function = _entry_points()[command].partition(":")
    # What the console script pip writes for the entry point does.
    script = f"import sys; from {module} import {function}; sys.argv[0] = {command!r}; sys.exit({function}())"
    run = subprocess.run([str(client_only_python), "-c", script], capture_output=True, text=True, env=_env(), timeout=60)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"{command}: ") and "'server' extra" in lines[0] and "torch" in lines[0], lines[0]
    assert "pip install 'roi-service[server]'" in lines[0]
    assert run.stdout == ""


def test_client_health_check_works_with_the_clients_own_dependencies(client_only_python):
    script = (
        "import sys; from roi_client import RoIClient\n"
        "import importlib.util; assert importlib.util.find_spec('grpc_health') is None\n"
        "with RoIClient(sys.argv[1], timeout=30) as c:\n"
        "    print(c.health(), c.health('roi.v1.RoIService'))\n"
    )
    with in_process_server() as srv:
        run = subprocess.run([str(client_only_python), "-c", script, srv.address], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["SERVING", "SERVING"], run.stdout
