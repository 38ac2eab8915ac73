"""Kafka security settings from the environment, for every client Legato creates (faust and aiokafka).

| variable | values |
|---|---|
| ``LEGATO_SECURITY_PROTOCOL`` | ``PLAINTEXT`` (default) · ``SSL`` · ``SASL_PLAINTEXT`` · ``SASL_SSL`` |
| ``LEGATO_SASL_MECHANISM`` | ``PLAIN`` (default with SASL) · ``SCRAM-SHA-256`` · ``SCRAM-SHA-512`` |
| ``LEGATO_SASL_USERNAME`` / ``LEGATO_SASL_PASSWORD`` | SASL credentials |
| ``LEGATO_SSL_CAFILE`` / ``LEGATO_SSL_CERTFILE`` / ``LEGATO_SSL_KEYFILE`` | PEM files (CA to verify the broker; client cert and key for mTLS) |
| ``LEGATO_SSL_KEY_PASSWORD`` | password of the key file, if any |

The password is never logged: :class:`Security` hides it from ``repr``, and :func:`redact` removes every configured
secret from a text (install :class:`RedactingFilter` on a logger to apply it to every record).
"""
from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Any, Mapping

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SECRET_VARS = ("LEGATO_SASL_PASSWORD", "LEGATO_SSL_KEY_PASSWORD", "LEGATO_CONSOLE_TOKEN")
REDACTED = "***"


class SecurityConfigError(ValueError):
    """A security setting that cannot work (unknown protocol, SASL without credentials, missing file …)."""


@dataclass(frozen=True)
class Security:
    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    key_password: str | None = field(default=None, repr=False)

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol.endswith("SSL")

    def __repr__(self) -> str:  # never the secrets
        return (f"Security(protocol={self.protocol!r}, mechanism={self.mechanism!r}, username={self.username!r}, "
                f"password={'***' if self.password else None}, cafile={self.cafile!r}, certfile={self.certfile!r}, keyfile={self.keyfile!r})")

    __str__ = __repr__


def from_env(env: Mapping[str, str] | None = None) -> Security:
    """Read and check the LEGATO_SECURITY_* / LEGATO_SASL_* / LEGATO_SSL_* variables."""
    env = os.environ if env is None else env
    protocol = (env.get("LEGATO_SECURITY_PROTOCOL") or "PLAINTEXT").strip().upper()
    if protocol not in PROTOCOLS:
        raise SecurityConfigError(f"LEGATO_SECURITY_PROTOCOL={protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    mechanism = None
    username = env.get("LEGATO_SASL_USERNAME") or None
    password = env.get("LEGATO_SASL_PASSWORD") or None
    if protocol.startswith("SASL_"):
        mechanism = (env.get("LEGATO_SASL_MECHANISM") or "PLAIN").strip().upper()
        if mechanism not in MECHANISMS:
            raise SecurityConfigError(f"LEGATO_SASL_MECHANISM={mechanism!r}: expected one of {', '.join(MECHANISMS)}")
        if not username or password is None:
            raise SecurityConfigError(f"{protocol} needs LEGATO_SASL_USERNAME and LEGATO_SASL_PASSWORD")
    files = {k: env.get(f"LEGATO_SSL_{k.upper()}") or None for k in ("cafile", "certfile", "keyfile")}
    for name, path in files.items():
        if path and not os.path.isfile(path):
            raise SecurityConfigError(f"LEGATO_SSL_{name.upper()}={path!r}: no such file")
    if bool(files["certfile"]) != bool(files["keyfile"]) and protocol.endswith("SSL"):
        raise SecurityConfigError("LEGATO_SSL_CERTFILE and LEGATO_SSL_KEYFILE go together (client certificate and its key)")
    return Security(protocol, mechanism, username, password, key_password=env.get("LEGATO_SSL_KEY_PASSWORD") or None, **files)


def ssl_context(sec: Security) -> ssl.SSLContext | None:
    if not sec.tls:
        return None
    from aiokafka.helpers import create_ssl_context

    try:
        return create_ssl_context(cafile=sec.cafile, certfile=sec.certfile, keyfile=sec.keyfile, password=sec.key_password)
    except ssl.SSLError as exc:  # the text of an SSLError never holds the password
        what = "LEGATO_SSL_CAFILE" if sec.cafile and not sec.certfile else "LEGATO_SSL_CERTFILE / LEGATO_SSL_KEYFILE (and LEGATO_SSL_KEY_PASSWORD if the key is encrypted)"
        raise SecurityConfigError(f"cannot load the TLS files: {exc.reason or exc}; check {what}") from None


def aiokafka_kwargs(sec: Security | None = None) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient / AIOKafkaClient."""
    sec = sec or from_env()
    if sec.protocol == "PLAINTEXT":
        return {}
    kwargs: dict[str, Any] = {"security_protocol": sec.protocol}
    if sec.sasl:
        kwargs.update(sasl_mechanism=sec.mechanism, sasl_plain_username=sec.username, sasl_plain_password=sec.password)
    if sec.tls:
        kwargs["ssl_context"] = ssl_context(sec)
    return kwargs


def faust_credentials(sec: Security | None = None) -> Any:
    """``broker_credentials`` for ``faust.App`` (None for PLAINTEXT). faust passes them to every client it creates
    (consumer, producer, admin) through ``credentials_to_aiokafka_auth``."""
    import faust
    from faust.types.auth import SASLMechanism

    sec = sec or from_env()
    if sec.protocol == "PLAINTEXT":
        return None
    if sec.protocol == "SSL":
        return faust.SSLCredentials(ssl_context(sec))
    mechanism = {"PLAIN": SASLMechanism.PLAIN, "SCRAM-SHA-256": SASLMechanism.SCRAM_SHA_256,
                 "SCRAM-SHA-512": SASLMechanism.SCRAM_SHA_512}[sec.mechanism or "PLAIN"]
    # SASL_SSL when an ssl_context is given, SASL_PLAINTEXT otherwise (faust.auth.SASLCredentials)
    return faust.SASLCredentials(username=sec.username, password=sec.password, mechanism=mechanism, ssl_context=ssl_context(sec))


def console_token(env: Mapping[str, str] | None = None) -> str | None:
    """``LEGATO_CONSOLE_TOKEN``: what every request to a console bound off loopback must carry (a secret: redacted)."""
    env = os.environ if env is None else env
    return env.get("LEGATO_CONSOLE_TOKEN") or None


def secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """The configured secret values (empty ones and very short ones excepted: redacting 'a' would garble logs)."""
    env = os.environ if env is None else env
    return [v for v in (env.get(k) for k in SECRET_VARS) if v and len(v) >= 4]


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """``text`` with every configured secret replaced by ``***``."""
    for secret in secrets(env):
        text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts configured secrets from every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not secrets():
            return True
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_redaction() -> None:
    """Redact secrets from everything logged by this process (root handlers and their children)."""
    f = RedactingFilter()
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(f)
    root.addFilter(f)


def diagnose(bootstrap: str, sec: Security | None = None, timeout: float = 5.0) -> str | None:
    """Why a client with these settings cannot talk TLS to the first broker of ``bootstrap``, naming the setting
    to fix; None when the TLS handshake works (or TLS is not configured), so the cause is elsewhere.

    aiokafka reports every failed handshake as "Unable to bootstrap"; this repeats the handshake with the same
    context to find out which side refused what. Blocking: call it on an error path or in a thread."""
    import socket

    sec = sec or from_env()
    if not sec.tls:
        return None
    first = bootstrap.split(",")[0].strip().split("://")[-1]
    host, _, port = first.rpartition(":")
    host = host.strip("[]") or "localhost"
    where = f"{host}:{port}"
    try:
        context = ssl_context(sec)
        assert context is not None
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(1.0)
                try:  # TLS 1.3: a broker that wants a client certificate says so after the handshake
                    tls.recv(1)
                except (socket.timeout, TimeoutError):
                    pass
    except SecurityConfigError as exc:
        return str(exc)
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason or str(exc)
        if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
            return f"the broker's certificate at {where} is not valid for {host!r} ({reason}): connect with a name it holds (LEGATO_BOOTSTRAP)"
        return (f"the broker's certificate at {where} is not trusted ({reason}): set LEGATO_SSL_CAFILE to the CA that signed it "
                f"(now {sec.cafile or 'unset: the system CAs'})")
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).lower()
        if "certificate_required" in reason or "certificate required" in reason:
            return f"the broker at {where} requires a client certificate: set LEGATO_SSL_CERTFILE and LEGATO_SSL_KEYFILE"
        if any(w in reason for w in ("unknown_ca", "unknown ca", "bad_certificate", "bad certificate", "certificate_unknown")):
            return f"the broker at {where} refused the client certificate LEGATO_SSL_CERTFILE={sec.certfile!r} ({exc.reason}): it must be signed by a CA the broker trusts"
        if "wrong_version_number" in reason or "wrong version number" in reason:
            return f"the broker at {where} does not speak TLS: check LEGATO_SECURITY_PROTOCOL (now {sec.protocol}) and the port"
        return f"TLS with the broker at {where} failed: {exc.reason or exc} (LEGATO_SSL_* settings)"
    except OSError:
        return None  # not a TLS problem: the broker is unreachable
    return None
