"""Secrets (LEGATO_SASL_PASSWORD, LEGATO_SSL_KEY_PASSWORD) never appear in logs, metric labels or run events."""
from __future__ import annotations

import asyncio
import logging
import time
import urllib.request

import pytest

from legato.streams import security

SECRET = "s3cr3t-Pa55w0rd-" + "9f2c"
ENV = {"LEGATO_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "LEGATO_SASL_MECHANISM": "SCRAM-SHA-512",
       "LEGATO_SASL_USERNAME": "svc", "LEGATO_SASL_PASSWORD": SECRET}


def test_repr_of_settings_and_credentials_hides_the_password():
    sec = security.from_env(ENV)
    assert SECRET not in repr(sec) and SECRET not in str(sec) and "***" in repr(sec)
    creds = security.faust_credentials(sec)
    assert SECRET not in repr(creds) and SECRET not in str(creds)
    assert security.aiokafka_kwargs(sec)["sasl_plain_password"] == SECRET  # handed to the client, nowhere else


def test_redact_and_logging_filter(monkeypatch, caplog):
    monkeypatch.setenv("LEGATO_SASL_PASSWORD", SECRET)
    assert security.redact(f"connect with {SECRET} now") == "connect with *** now"
    log = logging.getLogger("legato.test_no_secrets")
    log.addFilter(security.RedactingFilter())
    with caplog.at_level(logging.INFO, logger="legato.test_no_secrets"):
        log.info("password is %s", SECRET)
        try:
            raise RuntimeError(f"auth failed for {SECRET}")
        except RuntimeError:
            log.exception("boom")
    text = caplog.text + "".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert SECRET not in text and "***" in text


def test_short_or_empty_secrets_are_not_redacted():
    assert security.secrets({"LEGATO_SASL_PASSWORD": ""}) == []
    assert security.redact("abc", {"LEGATO_SASL_PASSWORD": "a"}) == "abc"


def test_bad_settings_are_refused_without_echoing_the_password():
    with pytest.raises(security.SecurityConfigError) as e:
        security.from_env({**ENV, "LEGATO_SASL_MECHANISM": "GSSAPI"})
    assert SECRET not in str(e.value)
    with pytest.raises(security.SecurityConfigError):
        security.from_env({"LEGATO_SECURITY_PROTOCOL": "SASL_SSL"})
    with pytest.raises(security.SecurityConfigError):
        security.from_env({"LEGATO_SECURITY_PROTOCOL": "TLS"})
    assert security.aiokafka_kwargs(security.from_env({})) == {}
    assert security.faust_credentials(security.from_env({})) is None


@pytest.mark.integration
async def test_secret_absent_from_logs_metrics_and_topics(kafka_bootstrap):
    """A coordinator and a worker run with the secret in their environment (at loglevel info, with metrics on):
    neither their output, nor /metrics, nor any record on runs/completions/requests/dlq contains it."""
    from legato.tools.harness import Env, RunWatch, Tail, free_port, mix_expected, producer, trigger, wait_ready

    env = Env(kafka_bootstrap, loglevel="info",
              extra_env={"LEGATO_SASL_PASSWORD": SECRET, "LEGATO_SASL_USERNAME": "svc", "LEGATO_SSL_KEY_PASSWORD": SECRET + "-key"})
    await env.create_topics()
    cport, wport = free_port(), free_port()
    coord = env.process("coordinator", env={"LEGATO_METRICS_PORT": str(cport)})
    worker = env.process("worker", env={"LEGATO_METRICS_PORT": str(wport)})
    topics = [env.topics.runs, env.topics.completions, env.topics.dlq, env.topics.requests("chaos_echo"), env.topics.coordinator]
    tail = await Tail(kafka_bootstrap, topics).start()
    watch = RunWatch(tail)
    prod = await producer(kafka_bootstrap)
    try:
        await wait_ready(env, prod, watch, [coord, worker])
        ids = {f"sec-{i}": mix_expected(i) for i in range(3)}
        for i, rid in enumerate(ids):
            await trigger(prod, env, "chaos_mix", {"n": i}, rid)
        await trigger(prod, env, "chaos_raise", {}, "sec-raise")  # an error path too
        await prod.send_and_wait(env.topics.triggers, b"\xffnot json")  # and a dead letter
        await prod.flush()
        assert await watch.wait(set(ids) | {"sec-raise"}, 60)
        metrics = "".join(urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read().decode() for p in (cport, wport))
        assert "legato_runs_completed_total" in metrics
        await asyncio.sleep(1.0)
    finally:
        await prod.stop()
        await tail.stop()
        env.stop_all()
    logs = "".join((env.workdir / f"{p.name}.log").read_text(errors="replace") for p in env.procs)
    assert "coordinator" in logs.lower() or len(logs) > 0
    for secret in (SECRET, SECRET + "-key"):
        assert secret not in logs, "secret in process output"
        assert secret not in metrics, "secret in /metrics"
        leaked = [r for r in tail.records if r.value and secret.encode() in r.value]
        assert not leaked, f"secret in {leaked[0].topic}"
