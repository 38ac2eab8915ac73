"""Local single-node Apache Kafka broker for development and tests.

There is no Docker on many developer and CI machines, but a JDK and Maven
usually are, so the broker is assembled from the Maven Central jars
(``ops/kafka/pom.xml``) and run directly with ``java`` in KRaft mode
(broker and controller in one process, no ZooKeeper).

Layout, all under ``${XDG_CACHE_HOME:-~/.cache}/legato``::

    kafka-3.9.1/libs/      jars (+ .complete marker once a fetch finished)
    broker/server.properties, log4j.properties, broker.log, broker.pid
    broker/cluster.id     cluster id used to format the storage
    broker/data/          log.dirs

Only the standard library and aiokafka are used so that this module can be
imported before the rest of the project is importable.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

KAFKA_VERSION = "3.9.1"
DEFAULT_BOOTSTRAP = "localhost:9092"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
JVM_HEAP = ("-Xms256m", "-Xmx768m")

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
_COMPLETE_MARKER = ".complete"


# --------------------------------------------------------------------------- paths


def cache_root() -> Path:
    """Root of Legato's per-user cache (``$XDG_CACHE_HOME/legato``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "legato"


def libs_dir() -> Path:
    """Directory holding the Kafka broker jars."""
    return cache_root() / f"kafka-{KAFKA_VERSION}" / "libs"


def broker_dir(bootstrap: str = DEFAULT_BOOTSTRAP) -> Path:
    """Directory holding the config, log, pid file and data of the local broker serving ``bootstrap``.

    One directory per port: the development broker (9092) and the test suite's broker (19092) never share a
    pid file or data, so neither ever refuses to start because of the other.
    """
    _, port = parse_bootstrap(bootstrap)
    return cache_root() / ("broker" if port == 9092 else f"broker-{port}")


def _data_dir(bootstrap: str) -> Path:
    return broker_dir(bootstrap) / "data"


def _pid_file(bootstrap: str) -> Path:
    return broker_dir(bootstrap) / "broker.pid"


def _log_file(bootstrap: str) -> Path:
    return broker_dir(bootstrap) / "broker.log"


def _pom_path() -> Path:
    """The Maven pom of the broker's jars: package data of ``legato.tools`` (in the checkout, a link to
    ``ops/kafka/pom.xml``), so an installed wheel fetches the same jars."""
    return Path(__file__).parent / "kafka_pom.xml"


# --------------------------------------------------------------------------- bootstrap parsing


def parse_bootstrap(bootstrap: str) -> tuple[str, int]:
    """Return ``(host, port)`` of the first server in a bootstrap string."""
    first = bootstrap.split(",")[0].strip()
    # Tolerate "PLAINTEXT://host:port" as people copy it from broker configs.
    if "://" in first:
        first = first.split("://", 1)[1]
    if first.startswith("["):  # [ipv6]:port
        host, _, rest = first[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, sep, port = first.rpartition(":")
        if not sep:
            host, port = first, ""
    return host or "localhost", int(port) if port else 9092


def is_local(bootstrap: str) -> bool:
    """True when the bootstrap points at this machine (where we may start a broker)."""
    host, _ = parse_bootstrap(bootstrap)
    return host.lower() in _LOCAL_HOSTS


# --------------------------------------------------------------------------- liveness

# aiokafka logs "Unable connect to ..." at ERROR for every refused probe; while we
# poll a starting broker that is expected, so those records are dropped - but only
# inside our probe's context, never for the application's own clients.
_probing: contextvars.ContextVar[bool] = contextvars.ContextVar("legato_probing", default=False)


class _ProbeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _probing.get()


_PROBE_FILTER = _ProbeFilter()
for _name in ("aiokafka", "aiokafka.conn", "aiokafka.client", "aiokafka.cluster"):
    logging.getLogger(_name).addFilter(_PROBE_FILTER)


async def broker_alive_async(bootstrap: str, timeout: float = 2.0) -> bool:
    """Return True if a Kafka broker at ``bootstrap`` answers a metadata request.

    A bare TCP connect is not enough: a KRaft broker accepts connections on its
    listener well before it has joined the quorum and can serve metadata.
    """
    from aiokafka.client import AIOKafkaClient

    token = _probing.set(True)
    try:
        from legato.streams.security import aiokafka_kwargs

        secured = aiokafka_kwargs()
    except Exception:  # a probe must answer even when the security settings are broken
        secured = {}
    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(int(timeout * 1000), 1000),
        connections_max_idle_ms=60_000,
        **secured,
    )
    try:
        # bootstrap() connects and sends a MetadataRequest; it raises if none answered.
        await asyncio.wait_for(client.bootstrap(), timeout)
        metadata = client.cluster
        return bool(metadata.brokers())
    except Exception:
        return False
    finally:
        try:
            await asyncio.wait_for(client.close(), timeout)
        except Exception:
            pass
        _probing.reset(token)


def broker_alive(bootstrap: str, timeout: float = 2.0) -> bool:
    """Synchronous :func:`broker_alive_async`.

    Uses ``asyncio.run`` when called outside an event loop; when a loop is
    already running in this thread (e.g. from async code calling sync helpers)
    the check runs on a private loop in a helper thread, since a running loop
    cannot be re-entered.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(broker_alive_async(bootstrap, timeout))

    result: list[bool] = [False]

    def _runner() -> None:
        result[0] = asyncio.run(broker_alive_async(bootstrap, timeout))

    t = threading.Thread(target=_runner, name="legato-broker-alive", daemon=True)
    t.start()
    t.join(timeout + 5)
    return result[0]


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- jars


def jars_present() -> bool:
    """True when a complete jar fetch is cached."""
    return (libs_dir() / _COMPLETE_MARKER).is_file()


def fetch_jars(force: bool = False) -> Path:
    """Download the Kafka broker jars from Maven Central (once) and return the libs dir.

    Uses ``mvn dependency:copy-dependencies`` on ``ops/kafka/pom.xml``. The
    marker file is written last so an interrupted fetch is redone next time.
    """
    libs = libs_dir()
    if jars_present() and not force:
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError(
            "Maven ('mvn') is needed to fetch the Kafka broker jars; install it "
            "(Debian: apt-get install maven) or point LEGATO_BOOTSTRAP at an existing broker."
        )
    pom = _pom_path()
    if not pom.is_file():
        raise RuntimeError(f"Kafka pom not found at {pom}")
    # Fetch into a temp dir then swap, so a half-populated libs dir never looks usable.
    tmp = libs.parent / "libs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [
        mvn, "-q", "-B", "-f", str(pom),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={tmp}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
        out = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"fetching Kafka jars failed (mvn exit {proc.returncode}):\n{out}")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    (libs / _COMPLETE_MARKER).write_text(f"kafka {KAFKA_VERSION}\n")
    return libs


# --------------------------------------------------------------------------- config


def server_properties(bootstrap: str = DEFAULT_BOOTSTRAP, data_dir: Path | None = None) -> str:
    """Render server.properties for a single-node KRaft broker serving ``bootstrap``.

    The controller listens on the next port (9092 -> 9093).
    """
    _, port = parse_bootstrap(bootstrap)
    cport = port + 1
    data = data_dir if data_dir is not None else _data_dir(bootstrap)
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{cport}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data),
        "num.partitions": "8",
        "auto.create.topics.enable": "true",
        # Single node: anything above 1 would leave internal topics unavailable.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        # Tests and demos create consumer groups constantly; the default 3 s delay
        # would add 3 s to every group join.
        "group.initial.rebalance.delay.ms": "0",
        # Kafka's default floor of 6 s would refuse a LEGATO_SESSION_TIMEOUT below it (docs/deploy.md, takeover time).
        "group.min.session.timeout.ms": "500",
        # Keep the dev broker's disk use small.
        "log.retention.hours": "24",
        "log.segment.bytes": str(64 * 1024 * 1024),
    }
    lines = ["# Generated by tools/kafka_local.py - edits are overwritten on start."]
    lines += [f"{k}={v}" for k, v in props.items()]
    return "\n".join(lines) + "\n"


def _log4j_properties(log_file: Path) -> str:
    return "\n".join([
        "log4j.rootLogger=WARN, file",
        "log4j.appender.file=org.apache.log4j.RollingFileAppender",
        f"log4j.appender.file.File={log_file}",
        "log4j.appender.file.MaxFileSize=10MB",
        "log4j.appender.file.MaxBackupIndex=2",
        "log4j.appender.file.layout=org.apache.log4j.PatternLayout",
        "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n",
        # One INFO line that tells the reader the broker came up.
        "log4j.logger.kafka.server.KafkaRaftServer=INFO",
        "",
    ])


def _cluster_id(bootstrap: str) -> str:
    """Return the stored cluster id, creating one (22-char base64url of a uuid) if needed."""
    path = broker_dir(bootstrap) / "cluster.id"
    if path.is_file():
        cid = path.read_text().strip()
        if len(cid) == 22:
            return cid
    cid = "-"
    while cid.startswith("-"):  # `kafka-storage format -t -abc` would read the id as an option
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    path.write_text(cid + "\n")
    return cid


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("Java (JDK 17+) is needed to run the local Kafka broker; install openjdk-17-jre-headless.")
    return java


def _jvm_args(bootstrap: str) -> list[str]:
    log4j = broker_dir(bootstrap) / "log4j.properties"
    return [
        *JVM_HEAP,
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{log4j}",
        f"-Dkafka.logs.dir={broker_dir(bootstrap)}",
        "-cp",
        str(libs_dir() / "*"),
    ]


def _write_config(bootstrap: str) -> Path:
    bdir = broker_dir(bootstrap)
    bdir.mkdir(parents=True, exist_ok=True)
    _data_dir(bootstrap).mkdir(parents=True, exist_ok=True)
    props = bdir / "server.properties"
    props.write_text(server_properties(bootstrap))
    (bdir / "log4j.properties").write_text(_log4j_properties(_log_file(bootstrap)))
    return props


def _format_storage(props: Path, bootstrap: str) -> None:
    cmd = [
        _java(), *_jvm_args(bootstrap), "kafka.tools.StorageTool", "format",
        "-t", _cluster_id(bootstrap), "-c", str(props), "--ignore-formatted",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(
            "formatting Kafka storage failed:\n" + (proc.stdout + proc.stderr)[-4000:]
            + f"\n(if the data dir belongs to another cluster, delete {_data_dir(bootstrap)})"
        )


# --------------------------------------------------------------------------- process


def broker_pid(bootstrap: str = DEFAULT_BOOTSTRAP) -> int | None:
    """The pid of the local broker serving ``bootstrap`` that this module started, or None (not local, or stopped)."""
    return _read_pid(bootstrap)


def _read_pid(bootstrap: str) -> int | None:
    try:
        pid = int(_pid_file(bootstrap).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_running(pid) else None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child) still answers kill(0); check /proc when we can.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _log_tail(bootstrap: str, lines: int = 40) -> str:
    try:
        text = _log_file(bootstrap).read_text(errors="replace")
    except OSError:
        return "(no broker.log)"
    return "\n".join(text.splitlines()[-lines:])


def start(bootstrap: str = DEFAULT_BOOTSTRAP, fresh: bool = False) -> str:
    """Start the local broker for ``bootstrap`` (detached) and wait until it serves metadata.

    No-op when a broker already answers there. Fetches the jars on first use,
    formats the storage and writes the pid file. Raises RuntimeError (with the
    tail of broker.log) if the broker does not come up within 90 s. ``fresh`` wipes
    the data first (test sessions: every session's topics add open files).
    """
    if broker_alive(bootstrap):
        return f"Kafka broker already running at {bootstrap}"
    _, port = parse_bootstrap(bootstrap)
    if not is_local(bootstrap):
        raise RuntimeError(f"refusing to start a broker for non-local bootstrap {bootstrap!r}")
    pid = _read_pid(bootstrap)
    if pid is not None:
        # Our broker is alive but not (yet) answering: maybe still starting, maybe
        # it serves another port. Wait briefly rather than starting a second one
        # that would fight over the same data dir.
        if _wait_alive(bootstrap, 30.0, pid):
            return f"Kafka broker already running at {bootstrap} (pid {pid})"
        raise RuntimeError(
            f"a local broker (pid {pid}) is running but does not answer at {bootstrap}; "
            f"stop it first (`legato kafka stop` with LEGATO_BOOTSTRAP={bootstrap}).\n--- broker.log tail ---\n{_log_tail(bootstrap)}"
        )
    for p in (port, port + 1):
        if _port_open("127.0.0.1", p):
            raise RuntimeError(f"port {p} is in use by something that is not a Kafka broker we can reach")

    t0 = time.monotonic()
    fetch_jars()
    if fresh and _data_dir(bootstrap).exists():
        shutil.rmtree(_data_dir(bootstrap))
    props = _write_config(bootstrap)
    _format_storage(props, bootstrap)

    log = open(_log_file(bootstrap), "ab")
    try:
        proc = subprocess.Popen(
            [_java(), *_jvm_args(bootstrap), "kafka.Kafka", str(props)],
            stdin=subprocess.DEVNULL,
            stdout=log,  # stdout/stderr catch JVM crashes that bypass log4j
            stderr=subprocess.STDOUT,
            cwd=str(broker_dir(bootstrap)),
            start_new_session=True,  # survive the caller's Ctrl-C / test session end
            preexec_fn=_raise_open_files_limit,
        )
    finally:
        log.close()
    _pid_file(bootstrap).write_text(f"{proc.pid}\n")

    if not _wait_alive(bootstrap, START_TIMEOUT_S, proc.pid, proc):
        rc = proc.poll()
        state = f"exited with code {rc}" if rc is not None else "still running, not answering"
        raise RuntimeError(
            f"Kafka broker at {bootstrap} did not come up within {START_TIMEOUT_S:.0f}s "
            f"(pid {proc.pid}, {state}).\n--- {_log_file(bootstrap)} (tail) ---\n{_log_tail(bootstrap)}"
        )
    return f"Kafka broker started at {bootstrap} (pid {proc.pid}) in {time.monotonic() - t0:.1f}s; logs: {_log_file(bootstrap)}"


def _raise_open_files_limit() -> None:
    """A broker keeps several files open per partition: thousands of test topics exceed the usual 20,000."""
    for limit in (1_048_576, 262_144, 65_536):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return
        except (ValueError, OSError):
            continue


def _wait_alive(bootstrap: str, timeout: float, pid: int, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if proc is None and not _pid_running(pid):
            return False
        if broker_alive(bootstrap, timeout=2.0):
            return True
        time.sleep(0.5)
    return False


def stop(bootstrap: str = DEFAULT_BOOTSTRAP) -> str:
    """Stop the local broker serving ``bootstrap``, recorded in its pid file (SIGTERM, then SIGKILL after 30 s)."""
    pid = _read_pid(bootstrap)
    if pid is None:
        _pid_file(bootstrap).unlink(missing_ok=True)
        return "no local Kafka broker running"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _pid_running(pid):
            break
        time.sleep(0.2)
    else:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _pid_file(bootstrap).unlink(missing_ok=True)
        return f"Kafka broker (pid {pid}) did not stop in {STOP_TIMEOUT_S:.0f}s; killed"
    _pid_file(bootstrap).unlink(missing_ok=True)
    return f"Kafka broker (pid {pid}) stopped"


def status(bootstrap: str = DEFAULT_BOOTSTRAP) -> tuple[bool, str]:
    """Return ``(alive, message)`` for the broker at ``bootstrap``."""
    pid = _read_pid(bootstrap)
    if broker_alive(bootstrap):
        who = f"local broker pid {pid}" if pid is not None else "external broker"
        return True, f"Kafka broker answering at {bootstrap} ({who})"
    if pid is not None:
        return False, f"local broker pid {pid} is running but does not answer at {bootstrap}"
    return False, f"no Kafka broker answering at {bootstrap}"


def ensure_broker(bootstrap: str, fresh: bool = False) -> None:
    """Make sure a broker answers at ``bootstrap``, starting the local one if needed (``fresh``: on empty data).

    Raises RuntimeError when nothing answers and the bootstrap is not local,
    since we can only start brokers on this machine.
    """
    if broker_alive(bootstrap):
        return
    if not is_local(bootstrap):
        raise RuntimeError(
            f"no Kafka broker answers at {bootstrap}, and it is not on localhost/127.0.0.1 "
            "so Legato cannot start one. Check LEGATO_BOOTSTRAP or start that broker."
        )
    start(bootstrap, fresh=fresh)


# --------------------------------------------------------------------------- secured test brokers
# Helpers for private test brokers (tools/harness.py's PrivateBroker and the security tests): certificates made with
# openssl, and the server.properties lines of an SSL listener and of the StandardAuthorizer.


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr[-2000:]}")


def make_certificates(directory: Path, clients: tuple[str, ...] = (), key_password: str | None = None) -> dict[str, Path | str]:
    """A throw-away CA in ``directory``, a broker certificate for 127.0.0.1/localhost signed by it, and one client
    certificate per name in ``clients`` (subject ``CN=<name>``). Needs ``openssl`` on the PATH.

    Returns paths: ``ca`` (PEM), ``keystore`` (the broker's PKCS12) and its ``keystore_password``, and per client
    ``<name>.crt`` / ``<name>.key`` (PEM; the key encrypted with ``key_password`` when given).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    days = "2"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", days,
             "-subj", f"/CN=legato-test-ca-{uuid.uuid4().hex[:8]}", cwd=d)

    def signed(name: str, ext: str) -> None:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.plain.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.crt",
                 "-days", days, "-extfile", f"{name}.ext", cwd=d)

    signed("broker", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    keystore_password = uuid.uuid4().hex
    _openssl("pkcs12", "-export", "-in", "broker.crt", "-inkey", "broker.plain.key", "-certfile", "ca.pem", "-name", "broker",
             "-out", "broker.p12", "-passout", f"pass:{keystore_password}", cwd=d)
    out: dict[str, Path | str] = {"ca": d / "ca.pem", "keystore": d / "broker.p12", "keystore_password": keystore_password}
    for name in clients:
        signed(name, "extendedKeyUsage=clientAuth\n")
        if key_password:
            _openssl("pkey", "-in", f"{name}.plain.key", "-out", f"{name}.key", "-aes256", "-passout", f"pass:{key_password}", cwd=d)
        else:
            shutil.copy(d / f"{name}.plain.key", d / f"{name}.key")
        out[f"{name}.crt"], out[f"{name}.key"] = d / f"{name}.crt", d / f"{name}.key"
    return out


def _override(properties: str, replace: dict[str, str], extra: list[str]) -> str:
    lines = []
    for line in properties.splitlines():
        key = line.split("=", 1)[0]
        lines.append(f"{key}={replace[key]}" if key in replace else line)
    return "\n".join(lines + extra) + "\n"


def ssl_properties(properties: str, port: int, cport: int, certs: dict[str, Path | str], mtls_port: int | None = None) -> str:
    """``properties`` (as :func:`server_properties` renders them) with the client listener on SSL at ``port``, and
    with ``mtls_port`` a second SSL listener (``MTLS``) that requires a client certificate; the controller stays
    PLAINTEXT on 127.0.0.1 at ``cport``. ``certs`` comes from :func:`make_certificates`. An mTLS client's principal
    is ``User:<CN>``."""
    listeners = [f"SSL://127.0.0.1:{port}"] + ([f"MTLS://127.0.0.1:{mtls_port}"] if mtls_port else [])
    replace = {
        "listeners": ",".join([*listeners, f"CONTROLLER://127.0.0.1:{cport}"]),
        "advertised.listeners": ",".join(listeners),
        "inter.broker.listener.name": "SSL",
        "listener.security.protocol.map": "SSL:SSL,MTLS:SSL,CONTROLLER:PLAINTEXT",
    }
    extra = [
        "ssl.keystore.type=PKCS12",
        f"ssl.keystore.location={certs['keystore']}",
        f"ssl.keystore.password={certs['keystore_password']}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={certs['ca']}",
        "ssl.client.auth=none",
        "ssl.principal.mapping.rules=RULE:^CN=([^,]+).*$/$1/,DEFAULT",
    ]
    if mtls_port:
        extra.append("listener.name.mtls.ssl.client.auth=required")
    return _override(properties, replace, extra)


def authorizer_properties(properties: str, super_users: list[str]) -> str:
    """``properties`` with the StandardAuthorizer on: nothing is allowed without an ACL except to ``super_users``.

    The broker reaches its own controller over the PLAINTEXT controller listener as ``User:ANONYMOUS``, which
    therefore is a super user too: use this only with authenticated client listeners (SASL), never PLAINTEXT."""
    supers = ";".join(dict.fromkeys([*super_users, "User:ANONYMOUS"]))
    return _override(properties, {}, [
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        f"super.users={supers}",
        "allow.everyone.if.no.acl.found=false",
    ])


def _main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "status"
    bs = argv[1] if len(argv) > 1 else DEFAULT_BOOTSTRAP
    if cmd == "start":
        print(start(bs))
    elif cmd == "stop":
        print(stop(bs))
    elif cmd == "fetch":
        print(fetch_jars())
    else:
        ok, msg = status(bs)
        print(msg)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
