"""Mutual TLS end to end: a real `dask scheduler` and `dask worker` on 127.0.0.1 that
require encryption; certs come from deploy/tls/make_certs.py.

(a) a client with the cluster's certs runs a task; (b) a plain-TCP client is refused
and its task never runs; (c) a client without a cert, or with a cert from another
CA, is refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from distributed import Client
from distributed.security import Security

from mixedscale.cluster import TLSConfig, make_security
from mixedscale.errors import SpecError

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
MAKE_CERTS = ROOT / "deploy" / "tls" / "make_certs.py"
DASK_TLS = ROOT / "deploy" / "tls" / "dask-tls.yaml"
START_TIMEOUT = 30.0
REFUSE_TIMEOUT = "3s"


def load_make_certs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_certs", MAKE_CERTS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tls_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    mod = load_make_certs()
    good = mod.make_certs(tmp_path_factory.mktemp("certs"), hosts=["127.0.0.1", "localhost"])
    rogue = mod.make_certs(tmp_path_factory.mktemp("rogue"), roles=["client"],
                           ca_name="someone else's CA")
    return {**good, "rogue": rogue["client"], "rogue-key": rogue["client-key"]}


@pytest.fixture(scope="module")
def tls_cluster(
    certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Address of a TLS-only scheduler with one TLS worker; both stopped on teardown."""
    d = tmp_path_factory.mktemp("tls-cluster")
    sched_file = d / "scheduler.json"
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def spawn(name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = d / f"{name}.log"
        logs.append(log)
        with open(log, "wb") as fh:
            p = subprocess.Popen(
                [sys.executable, "-m", *args], env={**_tls_env(), **env}, cwd=d,
                stdout=fh, stderr=subprocess.STDOUT,
            )
        procs.append(p)
        return p

    try:
        sched = spawn("scheduler", [
            "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
            "--protocol", "tls", "--no-dashboard", "--scheduler-file", str(sched_file),
            "--tls-ca-file", str(certs["ca"]),
            "--tls-cert", str(certs["scheduler"]), "--tls-key", str(certs["scheduler-key"]),
        ])
        deadline = time.monotonic() + START_TIMEOUT
        address = ""
        while not address:
            if sched.poll() is not None:
                pytest.fail(f"dask scheduler exited early:\n{_tail(logs[0])}")
            if time.monotonic() > deadline:
                pytest.fail(f"dask scheduler did not start:\n{_tail(logs[0])}")
            try:
                address = json.loads(sched_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        assert address.startswith("tls://127.0.0.1:"), address

        # The worker takes its certificates from the shipped deploy/tls/dask-tls.yaml
        # (paths moved to the test's certs) instead of --tls-* flags.
        config = d / "dask-tls.yaml"
        config.write_text(DASK_TLS.read_text().replace("/etc/dask/tls", str(certs["ca"].parent)))
        spawn("worker", [
            "distributed.cli.dask_worker", address, "--host", "127.0.0.1",
            "--nworkers", "1", "--nthreads", "1", "--no-nanny", "--no-dashboard",
            "--memory-limit", "0", "--death-timeout", "30",
        ], DASK_CONFIG=str(config))
        with Client(address, security=good_security(certs), timeout="20s") as c:
            c.wait_for_workers(1, timeout=START_TIMEOUT)
        yield address
    finally:
        for p in reversed(procs):
            _stop(p)


def good_security(certs: dict[str, Path]) -> Security:
    sec = make_security(TLSConfig(ca_file=str(certs["ca"]), cert=str(certs["client"]),
                                  key=str(certs["client-key"])))
    assert sec is not None
    return sec


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _scheduler_clients(address: str, certs: dict[str, Path]) -> int:
    with Client(address, security=good_security(certs), timeout="20s") as c:
        n = c.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.clients))
    return int(n)


def _raw_tls_refused(port: int, ca: Path, cert: Path | None = None,
                     key: Path | None = None) -> bool:
    """True if the server aborts this TLS session (bad or no client certificate).

    It aborts during the handshake (TLS 1.2) or right after it, with an alert on
    the first read (TLS 1.3); a server that accepted sends its Dask handshake
    (or waits), so the first read returns data (or times out).
    """
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert), None if key is None else str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.settimeout(2)
                return tls.recv(1) == b""
        except TimeoutError:
            return False
        except (ssl.SSLError, ConnectionError):
            return True


def test_tls_client_with_certs_runs_a_task(
    tls_cluster: str, certs: dict[str, Path], tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    with Client(tls_cluster, security=good_security(certs), timeout="20s") as c:
        assert c.submit(canary.write_text, "ran", pure=False).result(timeout=20) == 3
        assert c.submit(sum, [1, 2, 3]).result(timeout=20) == 6
        info = c.scheduler_info()
    assert canary.read_text() == "ran"
    assert all(w.startswith("tls://") for w in info["workers"])


def test_plain_tcp_client_is_refused(
    tls_cluster: str, certs: dict[str, Path], tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    before = _scheduler_clients(tls_cluster, certs)
    with pytest.raises((OSError, TimeoutError)):
        c = Client(f"tcp://127.0.0.1:{_port(tls_cluster)}", timeout=REFUSE_TIMEOUT)
        try:  # never reached if refused; if it were, the task must still not run
            c.submit(canary.write_text, "ran", pure=False).result(timeout=5)
        finally:
            c.close()
    time.sleep(0.5)
    assert not canary.exists()
    assert _scheduler_clients(tls_cluster, certs) == before


def test_tls_client_without_client_cert_is_refused(
    tls_cluster: str, certs: dict[str, Path], tmp_path: Path
) -> None:
    # A TLS client that trusts the CA but presents no certificate is cut off at
    # the TLS layer; the same client with the cluster's client cert is not.
    port = _port(tls_cluster)
    assert _raw_tls_refused(port, certs["ca"])
    assert _raw_tls_refused(port, certs["ca"], certs["rogue"], certs["rogue-key"])
    assert not _raw_tls_refused(port, certs["ca"], certs["client"], certs["client-key"])

    # A dask client without a cert cannot even be configured for tls://.
    with pytest.raises((TypeError, OSError, TimeoutError)):
        Client(tls_cluster, security=Security(tls_ca_file=str(certs["ca"])),
               timeout=REFUSE_TIMEOUT).close()

    # A dask client whose cert comes from another CA is refused by the scheduler.
    canary = tmp_path / "canary"
    rogue = Security(tls_ca_file=str(certs["ca"]), tls_client_cert=str(certs["rogue"]),
                     tls_client_key=str(certs["rogue-key"]), require_encryption=True)
    with pytest.raises((OSError, TimeoutError)):
        c = Client(tls_cluster, security=rogue, timeout=REFUSE_TIMEOUT)
        try:
            c.submit(canary.write_text, "ran", pure=False).result(timeout=5)
        finally:
            c.close()
    time.sleep(0.5)
    assert not canary.exists()


def test_make_security_checks_files(certs: dict[str, Path], tmp_path: Path) -> None:
    sec = good_security(certs)
    assert sec.require_encryption
    for role in ("client", "scheduler", "worker"):
        conf = sec.get_tls_config_for_role(role)
        assert conf["ca_file"] == str(certs["ca"])
        assert conf["cert"] == str(certs["client"])
    assert make_security(None) is None

    missing = tmp_path / "nope.pem"
    with pytest.raises(SpecError, match=r"nope\.pem"):
        make_security(TLSConfig(ca_file=str(missing), cert=str(certs["client"]),
                                key=str(certs["client-key"])))
    with pytest.raises(SpecError, match=r"tls\.key"):
        make_security(TLSConfig(ca_file=str(certs["ca"]), cert=str(certs["client"]),
                                key=str(missing)))
    # a key that does not belong to the cert
    with pytest.raises(SpecError, match="matching"):
        make_security(TLSConfig(ca_file=str(certs["ca"]), cert=str(certs["client"]),
                                key=str(certs["worker-key"])))
