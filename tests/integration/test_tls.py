"""TLS and mTLS on a private broker: the coordinator, a worker, ``legato trigger --wait`` and LegatoClient connect
with the LEGATO_SSL_* settings only; a client that trusts another CA, or brings no certificate where one is
required, is refused with an error naming the setting to fix; no secret reaches a log.

The broker (tools/harness.py's PrivateBroker with tools/kafka_local.py's ``ssl_properties``) listens with TLS on
19494 and with required client certificates (mTLS) on 19498; its controller is on 19495. Certificates are made here
with openssl, in the test's temporary directory.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from legato.streams import security
from legato.tools import kafka_local
from legato.tools.harness import PrivateBroker
from legato.topics.client import LegatoClient
from tests.integration.conftest import REPO_ROOT, Service, _start, legato_executable
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.integration

TLS_PORT, MTLS_PORT = 19494, 19498
KEY_PASSWORD = "key-pw-" + uuid.uuid4().hex[:12]
HANDLERS = "tests.integration.e2e_handlers"
WORKFLOW = """\
name: tls_echo
timeout: 30s
steps:
  - id: echo
    activity: e2e_echo
    input: {echoed: "${ input.value }"}
output: "steps.echo.output"
"""


class TlsBroker(PrivateBroker):
    def __init__(self, certs: dict, workdir: Path):
        super().__init__(port=TLS_PORT, workdir=workdir)
        self.certs = certs

    def properties(self) -> str:
        return kafka_local.ssl_properties(super().properties(), self.port, self.cport, self.certs, MTLS_PORT)


def tls_env(certs: dict, port: int = TLS_PORT, client_cert: bool = False) -> dict[str, str]:
    env = {"LEGATO_BOOTSTRAP": f"127.0.0.1:{port}", "LEGATO_SECURITY_PROTOCOL": "SSL", "LEGATO_SSL_CAFILE": str(certs["ca"])}
    if client_cert:
        env.update(LEGATO_SSL_CERTFILE=str(certs["legato.crt"]), LEGATO_SSL_KEYFILE=str(certs["legato.key"]), LEGATO_SSL_KEY_PASSWORD=KEY_PASSWORD)
    return env


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    if not kafka_local.jars_present():
        skip_or_fail("Kafka jars not fetched (scripts/setup.sh fetches them)")
    base = tmp_path_factory.mktemp("pki")
    certs = kafka_local.make_certificates(base / "ours", clients=("legato",), key_password=KEY_PASSWORD)
    certs["other-ca"] = kafka_local.make_certificates(base / "theirs")["ca"]
    return certs


@pytest.fixture(scope="module")
def tls_broker(pki, tmp_path_factory):
    broker = TlsBroker(pki, tmp_path_factory.mktemp("tls-broker"))
    with pytest.MonkeyPatch.context() as mp:  # the readiness probe uses the LEGATO_* settings, like every client
        for k, v in tls_env(pki).items():
            mp.setenv(k, v)
        broker.start()
    try:
        yield broker
    finally:
        broker.cleanup()


async def round_trip(bootstrap: str, kwargs: dict) -> bytes:
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=10_000, **kwargs)
    await producer.start()
    try:
        payload = uuid.uuid4().hex.encode()
        for _ in range(40):  # auto-created on first use
            try:
                await producer.send_and_wait(topic, payload, key=b"k")
                break
            except Exception:
                await asyncio.sleep(0.25)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", **kwargs)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
        for _ in range(40):
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                return msgs[0].value
        raise AssertionError("nothing consumed")
    finally:
        await consumer.stop()


@pytest.mark.parametrize("port,client_cert", [(TLS_PORT, False), (MTLS_PORT, True)], ids=["tls", "mtls"])
async def test_round_trip(tls_broker, pki, port, client_cert):
    env = tls_env(pki, port, client_cert)
    kwargs = security.aiokafka_kwargs(security.from_env(env))
    assert await round_trip(env["LEGATO_BOOTSTRAP"], kwargs)
    assert security.diagnose(env["LEGATO_BOOTSTRAP"], security.from_env(env)) is None


async def test_mtls_listener_refuses_a_client_without_certificate(tls_broker, pki):
    env = tls_env(pki, MTLS_PORT)
    producer = AIOKafkaProducer(bootstrap_servers=env["LEGATO_BOOTSTRAP"], request_timeout_ms=5_000, **security.aiokafka_kwargs(security.from_env(env)))
    with pytest.raises(KafkaConnectionError):
        try:
            await asyncio.wait_for(producer.start(), 30)
        finally:
            await producer.stop()
    reason = security.diagnose(env["LEGATO_BOOTSTRAP"], security.from_env(env))
    assert reason and "LEGATO_SSL_CERTFILE" in reason, reason


def cli(args: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([legato_executable(), *args], cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


async def test_another_ca_is_refused_naming_the_setting(tls_broker, pki):
    env = {**tls_env(pki), "LEGATO_SSL_CAFILE": str(pki["other-ca"])}
    done = await asyncio.to_thread(cli, ["trigger", "tls_echo", "--input", "{}"], env)
    assert done.returncode == 1, done.stderr
    assert "LEGATO_SSL_CAFILE" in done.stderr and "not trusted" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


async def test_a_wrong_key_password_names_the_setting(tls_broker, pki):
    env = {**tls_env(pki, MTLS_PORT, client_cert=True), "LEGATO_SSL_KEY_PASSWORD": "not-the-password"}
    done = await asyncio.to_thread(cli, ["trigger", "tls_echo", "--input", "{}"], env)
    assert done.returncode == 2 and "LEGATO_SSL_KEY_PASSWORD" in done.stderr, done.stderr
    assert "not-the-password" not in done.stderr


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mtls_processes(tls_broker, pki, tmp_path_factory):
    """A coordinator and a worker, both with client certificates on the mTLS listener."""
    work = tmp_path_factory.mktemp("tls-legato")
    (work / "workflows").mkdir()
    (work / "workflows" / "tls_echo.yaml").write_text(WORKFLOW)
    env = {**os.environ, **tls_env(pki, MTLS_PORT, client_cert=True), "LEGATO_TOPIC_PREFIX": f"tls{uuid.uuid4().hex[:8]}",
           "LEGATO_WORKFLOWS": str(work / "workflows"), "LEGATO_HANDLERS": HANDLERS, "LEGATO_DATA_DIR": str(work),
           "LEGATO_PARTITIONS": "2", "LEGATO_LOGLEVEL": "info", "PYTHONUNBUFFERED": "1"}
    services = [_start("coordinator", ["coordinator"], env, work), _start("worker", ["worker", "--activity", "e2e_echo"], env, work)]
    try:
        yield env, services
    finally:
        for s in services:
            s.stop()


async def run_when_ready(client: LegatoClient, services: list[Service], timeout: float = 90) -> object:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        for s in services:
            assert s.proc.poll() is None, s.logs()
        try:
            return await client.run("tls_echo", {"value": "over mTLS"}, timeout=10)
        except (asyncio.TimeoutError, KafkaConnectionError):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("no run completed:\n" + "\n".join(s.logs() for s in services))


async def test_end_to_end_over_tls_and_mtls(mtls_processes, pki):
    env, services = mtls_processes
    prefix = env["LEGATO_TOPIC_PREFIX"]
    mtls = security.from_env(tls_env(pki, MTLS_PORT, client_cert=True))
    async with LegatoClient(f"127.0.0.1:{MTLS_PORT}", prefix, **security.aiokafka_kwargs(mtls)) as client:
        event = await run_when_ready(client, services)
    assert event.status == "succeeded" and event.output == {"echoed": "over mTLS"}, event
    # the CLI on the TLS listener, without a client certificate
    done = await asyncio.to_thread(cli, ["trigger", "tls_echo", "--input", '{"value": "cli"}', "--wait", "--timeout", "60"],
                                   {**tls_env(pki), "LEGATO_TOPIC_PREFIX": prefix})
    assert done.returncode == 0, done.stderr
    assert '"status":"succeeded"' in done.stdout and '"echoed":"cli"' in done.stdout, done.stdout
    # and with a client certificate on the mTLS listener
    done_mtls = await asyncio.to_thread(cli, ["trigger", "tls_echo", "--input", '{"value": "cli-mtls"}', "--wait", "--timeout", "60"],
                                        {**tls_env(pki, MTLS_PORT, client_cert=True), "LEGATO_TOPIC_PREFIX": prefix})
    assert done_mtls.returncode == 0 and '"echoed":"cli-mtls"' in done_mtls.stdout, done_mtls.stderr
    for s in services:
        assert s.proc.poll() is None, s.logs()
        text = s.stdout.read_text(errors="replace") + s.stderr.read_text(errors="replace")
        assert KEY_PASSWORD not in text and str(pki["keystore_password"]) not in text
    assert KEY_PASSWORD not in done.stdout + done.stderr + done_mtls.stdout + done_mtls.stderr
