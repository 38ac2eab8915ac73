"""Security checks that need no broker: no code from data (gaps beyond test_architecture), size limits,
and the Kafka security settings of streams/security.py."""
from __future__ import annotations

import ast
import ssl
from pathlib import Path

import pytest

from legato.streams import security
from legato.topics import codec
from legato.topics.models import RunRequested

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["topics", "workflows", "streams", "handlers"]
# test_architecture.py covers eval/exec/pickle/yaml.load; these are the other ways to run code from bytes.
FORBIDDEN_MODULES = {"marshal", "shelve", "dill", "cloudpickle", "jsonpickle", "code", "codeop"}
FORBIDDEN_BUILTINS = {"compile", "__import__"}
# importing modules by name is fine only from configuration (--handlers), never from a message or a definition
IMPORT_BY_NAME_ALLOWED = {"handlers/registry.py"}


def _sources():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def test_no_other_ways_to_run_code_from_data():
    problems = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{rel}: import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                problems.append(f"{rel}: from {node.module} import")
            elif isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in FORBIDDEN_BUILTINS:
                    problems.append(f"{rel}:{node.lineno}: {f.id}()")
                if isinstance(f, ast.Attribute) and f.attr == "import_module" and rel not in IMPORT_BY_NAME_ALLOWED:
                    problems.append(f"{rel}:{node.lineno}: import_module()")
                if isinstance(f, ast.Attribute) and f.attr == "system" and isinstance(f.value, ast.Name) and f.value.id == "os":
                    problems.append(f"{rel}:{node.lineno}: os.system()")
                for kw in node.keywords:
                    if kw.arg == "shell" and isinstance(kw.value, ast.Constant) and kw.value.value is True:
                        problems.append(f"{rel}:{node.lineno}: shell=True")
    assert not problems, problems


def test_message_size_limit():
    limit = codec.MAX_MESSAGE_BYTES
    assert limit == 1024 * 1024
    ok = b'{"workflow":"w","input":{"pad":"' + b"x" * (limit - 64) + b'"}}'
    assert len(ok) <= limit and codec.decode(RunRequested, ok).workflow == "w"
    with pytest.raises(codec.DecodeError, match="exceeds the limit"):
        codec.decode(RunRequested, ok + b" " * (limit - len(ok) + 1))


def test_deep_nesting_is_a_decode_error_not_a_crash():
    with pytest.raises(codec.DecodeError):
        codec.decode(RunRequested, b'{"workflow":"w","input":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}")


@pytest.mark.parametrize("protocol", security.PROTOCOLS)
def test_every_protocol_maps_to_aiokafka_and_faust(protocol, tmp_path):
    env = {"LEGATO_SECURITY_PROTOCOL": protocol, "LEGATO_SASL_USERNAME": "u", "LEGATO_SASL_PASSWORD": "pw-123456"}
    sec = security.from_env(env)
    kw = security.aiokafka_kwargs(sec)
    creds = security.faust_credentials(sec)
    if protocol == "PLAINTEXT":
        assert kw == {} and creds is None
        return
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    faust_kw = credentials_to_aiokafka_auth(creds)
    assert kw["security_protocol"] == protocol == faust_kw["security_protocol"]
    if protocol.startswith("SASL"):
        assert kw["sasl_mechanism"] == "PLAIN" == faust_kw["sasl_mechanism"]
        assert kw["sasl_plain_username"] == "u" == faust_kw["sasl_plain_username"]
    if protocol.endswith("SSL"):
        assert isinstance(kw["ssl_context"], ssl.SSLContext) and isinstance(faust_kw["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize("mechanism", security.MECHANISMS)
def test_mechanisms(mechanism):
    env = {"LEGATO_SECURITY_PROTOCOL": "sasl_plaintext", "LEGATO_SASL_MECHANISM": mechanism.lower(),
           "LEGATO_SASL_USERNAME": "u", "LEGATO_SASL_PASSWORD": "p"}
    assert security.aiokafka_kwargs(security.from_env(env))["sasl_mechanism"] == mechanism
    assert security.faust_credentials(security.from_env(env)).mechanism.value == mechanism


def test_missing_files_and_credentials_are_refused(tmp_path):
    with pytest.raises(security.SecurityConfigError, match="no such file"):
        security.from_env({"LEGATO_SECURITY_PROTOCOL": "SSL", "LEGATO_SSL_CAFILE": str(tmp_path / "nope.pem")})
    with pytest.raises(security.SecurityConfigError, match="USERNAME"):
        security.from_env({"LEGATO_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "LEGATO_SASL_PASSWORD": "x"})
    with pytest.raises(security.SecurityConfigError, match="go together"):
        (tmp_path / "c.pem").write_text("x")
        security.from_env({"LEGATO_SECURITY_PROTOCOL": "SSL", "LEGATO_SSL_CERTFILE": str(tmp_path / "c.pem")})
