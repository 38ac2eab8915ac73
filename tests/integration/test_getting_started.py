"""The five minutes of README and docs/getting-started.md, as a user runs them: a project folder of its own with
the page's workflow and handler module, `legato dev --workflows ./flows --handlers my_handlers`, then
`legato trigger greet --input '{"name": "Ada"}' --wait` (separate processes, on the real broker)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.integration.conftest import REPO_ROOT, legato_executable

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _page_blocks(language: str) -> list[str]:
    page = (REPO_ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", page, re.S)


async def _topic_exists(bootstrap: str, topic: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return topic in await admin.list_topics()
    finally:
        await admin.close()


async def test_your_own_project_in_five_minutes(kafka_bootstrap, tmp_path: Path):
    project = tmp_path / "my-project"
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "greet.yaml").write_text(_page_blocks("yaml")[0], encoding="utf-8")
    (project / "my_handlers.py").write_text(_page_blocks("python")[0], encoding="utf-8")
    commands = "".join(_page_blocks("bash"))
    assert "legato dev --workflows ./flows --handlers my_handlers" in commands
    assert """legato trigger greet --input '{"name": "Ada"}' --wait""" in commands

    prefix = f"gs{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "LEGATO_BOOTSTRAP": kafka_bootstrap, "LEGATO_TOPIC_PREFIX": prefix,
           "LEGATO_DATA_DIR": str(tmp_path / "data"), "LEGATO_CONSOLE_PORT": str(_free_port()), "PYTHONUNBUFFERED": "1"}
    for name in ("LEGATO_WORKFLOWS", "LEGATO_HANDLERS", "LEGATO_METRICS_PORT"):
        env.pop(name, None)
    log = open(tmp_path / "dev.log", "wb")
    dev = subprocess.Popen([legato_executable(), "dev", "--workflows", "./flows", "--handlers", "my_handlers"], cwd=project,
                           env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not await _topic_exists(kafka_bootstrap, f"{prefix}.requests.shout"):  # dev created the contract's topics
            assert dev.poll() is None, (tmp_path / "dev.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "legato dev did not create its topics"
            await asyncio.sleep(0.5)
        proc = await asyncio.create_subprocess_exec(
            legato_executable(), "trigger", "greet", "--input", '{"name": "Ada"}', "--wait", "--timeout", "60",
            cwd=project, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, (out.decode(), err.decode(), (tmp_path / "dev.log").read_text(errors="replace")[-3000:])
        event = json.loads(out.decode().strip().splitlines()[-1])
        assert event["status"] == "succeeded" and event["output"] == {"greeting": "HELLO, ADA!"}, event
    finally:
        dev.terminate()
        try:
            dev.wait(30)
        except subprocess.TimeoutExpired:
            dev.kill()
            dev.wait()
        log.close()
