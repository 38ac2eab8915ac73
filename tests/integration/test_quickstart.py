"""Your own project in five minutes, as a user does it: a wheel built from this checkout, installed in a fresh
virtualenv in a folder outside the checkout, runs ``legato kafka start``, then ``legato dev`` with the user's own
workflow folder and handler module, and ``legato trigger ... --wait`` succeeds."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import orjson
import pytest

from legato.tools import kafka_local
from legato.tools.harness import free_port, free_port_pair

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

FLOW = """\
name: greet
steps:
  - id: hello
    activity: say_hello
    input: {name: "${ input.name }"}
output: "steps.hello.output"
"""

HANDLERS = """\
from legato.handlers.registry import activity


@activity("say_hello")
async def say_hello(data: dict) -> dict:
    return {"greeting": f"Hello, {data['name']}!"}
"""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_a_wheel_installed_outside_the_checkout_runs_a_users_own_workflow(tmp_path_factory):
    home = tmp_path_factory.mktemp("quickstart")
    assert ROOT not in home.parents
    wheels = home / "wheels"
    built_here = not (ROOT / "build").exists()
    try:
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], timeout=600)
    finally:
        if built_here:  # setuptools builds in the checkout's build/: leave the checkout as it was
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    [wheel] = wheels.glob("legato-*.whl")
    env_dir = home / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--find-links", str(wheels)]
    _run([*pip, str(wheel)], timeout=900)
    legato = str(env_dir / "bin" / "legato")

    project = home / "my_project"
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "greet.yaml").write_text(FLOW)
    (project / "my_handlers.py").write_text(HANDLERS)
    port = free_port_pair()
    bootstrap = f"127.0.0.1:{port}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("LEGATO_", "PYTHON", "VIRTUAL_ENV"))},
           "LEGATO_BOOTSTRAP": bootstrap, "LEGATO_CONSOLE_PORT": str(free_port()), "LEGATO_DATA_DIR": str(home / "data"),
           "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    dev = None
    try:
        started = _run([legato, "kafka", "start"], cwd=project, env=env, timeout=300)
        assert "started" in started.stdout or "running" in started.stdout, started.stdout
        with open(home / "dev.log", "wb") as log:
            dev = subprocess.Popen([legato, "dev", "--workflows", "./flows", "--handlers", "my_handlers"], cwd=project, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        result = None
        while time.monotonic() < deadline:
            assert dev.poll() is None, (home / "dev.log").read_text(errors="replace")[-3000:]
            result = subprocess.run([legato, "trigger", "greet", "--input", '{"name": "Ada"}', "--wait", "--timeout", "30"],
                                    cwd=project, env=env, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                break
            time.sleep(2)
        assert result is not None and result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{(home / 'dev.log').read_text(errors='replace')[-3000:]}"
        event = orjson.loads(result.stdout.strip().splitlines()[-1])
        assert event["status"] == "succeeded" and event["output"] == {"greeting": "Hello, Ada!"}, event
    finally:
        if dev is not None and dev.poll() is None:
            os.killpg(dev.pid, signal.SIGTERM)
            try:
                dev.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
        subprocess.run([legato, "kafka", "stop"], cwd=project, env=env, capture_output=True, timeout=120)
        shutil.rmtree(kafka_local.broker_dir(bootstrap), ignore_errors=True)
