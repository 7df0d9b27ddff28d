"""Safe by default: key pairs from ``diffsplit keys new``, workers that refuse to start exposed,
uploads only from allow-listed clients, and client commands that take their keys as flags."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.remote.exposure import InsecureWorker, check_worker_exposure, is_loopback_endpoint
from diffsplit.remote.worker import Worker, WorkerConfig
from diffsplit.transport.auth import (
    CLIENT_KEY_ENV,
    SERVER_KEY_ENV,
    ServerCurve,
    client_curve,
    load_keypair,
    load_public_keys,
)
from diffsplit.transport.errors import PeerGone, TransportError
from diffsplit.transport.protocol import DEFAULT_SETTINGS, Settings
from diffsplit.transport.sockets import Client

from diffsplit.cli import build_parser, main
from diffsplit.client_args import client_options
from diffsplit.demo import READY_PREFIX

FAST = Settings(heartbeat_interval=0.2, heartbeat_timeout=1.5)


def new_keys(folder: Path, name: str, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    assert main(["keys", "new", name, "--dir", str(folder)]) == 0
    printed = capsys.readouterr().out
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    assert str(public) in printed and str(secret) in printed
    return public, secret


class Served:
    """An in-process worker served by a thread until ``close``."""

    def __init__(self, config: WorkerConfig) -> None:
        self.worker = Worker(config)
        self.address = self.worker.endpoint
        self._thread = threading.Thread(target=self.worker.serve, name="test-auth-worker-serve")
        self._thread.start()

    def close(self) -> None:
        self.worker.stop()
        self._thread.join(60)
        assert not self._thread.is_alive()


@pytest.fixture
def key_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """``worker`` and ``alice`` pairs, and ``clients/`` holding alice's public key only."""
    new_keys(tmp_path, "worker", capsys)
    alice_public, _ = new_keys(tmp_path, "alice", capsys)
    (tmp_path / "clients").mkdir()
    (tmp_path / "clients" / "alice.key").write_text(alice_public.read_text())
    return tmp_path


def serve_with_keys(models: Path, key_folder: Path) -> Served:
    """A worker started from the key files as ``diffsplit worker`` reads them, uploads on."""
    allowed = load_public_keys(key_folder / "clients")
    curve = ServerCurve(load_keypair(key_folder / "worker.key_secret"), allowed)
    return Served(WorkerConfig(models=models, listen="tcp://127.0.0.1:*", curve=curve, grace_s=1.0,
                               allow_upload=True, settings=FAST))


@pytest.fixture
def curve_worker(models_dir: Path, key_folder: Path) -> Iterator[Served]:
    served = serve_with_keys(models_dir, key_folder)
    yield served
    served.close()


# -- keys new ---------------------------------------------------------------------------------------


def test_keys_new_writes_a_pair_and_never_overwrites(tmp_path: Path, capsys) -> None:
    public, secret = new_keys(tmp_path / "keys", "worker", capsys)
    pair = load_keypair(secret)
    assert pair.secret is not None and load_keypair(public).public == pair.public
    assert load_keypair(public).secret is None  # the public file holds no secret
    if os.name == "posix":
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    before = (public.read_bytes(), secret.read_bytes())
    assert main(["keys", "new", "worker", "--dir", str(tmp_path / "keys")]) == 1
    error = capsys.readouterr().err
    assert "worker.key" in error and "nothing was written" in error
    assert (public.read_bytes(), secret.read_bytes()) == before
    secret.unlink()  # a lone public key left over still blocks a new pair of that name
    assert main(["keys", "new", "worker", "--dir", str(tmp_path / "keys")]) == 1
    assert public.read_bytes() == before[0] and not secret.exists()
    capsys.readouterr()
    assert main(["keys", "new", "../escape", "--dir", str(tmp_path / "keys")]) == 1
    assert "plain file name" in capsys.readouterr().err
    assert not list(tmp_path.glob("escape*"))


def test_a_worker_and_a_client_with_keys_new_pairs_connect_and_a_wrong_key_is_refused(
    curve_worker: Served, key_folder: Path
) -> None:
    alice = client_curve(key_folder / "alice.key_secret", str(key_folder / "worker.key"))
    with Client(curve_worker.address, settings=FAST, curve=alice) as client:
        assert client.request({"op": "hello"}, timeout=30)["op"] == "result"
    z85 = load_keypair(key_folder / "worker.key").public.decode()
    by_text = client_curve(key_folder / "alice.key_secret", z85)  # --server-key as Z85 text
    with Client(curve_worker.address, settings=FAST, curve=by_text) as client:
        assert client.request({"op": "hello"}, timeout=30)["op"] == "result"
    # the worker's own pair is a valid key, just not on the allow-list: refused
    stranger = client_curve(key_folder / "worker.key_secret", str(key_folder / "worker.key"))
    with Client(curve_worker.address, settings=FAST, curve=stranger) as client, pytest.raises(PeerGone):
        client.request({"op": "hello"}, timeout=30)
    wrong_server = client_curve(key_folder / "alice.key_secret", str(key_folder / "alice.key"))
    with Client(curve_worker.address, settings=FAST, curve=wrong_server) as client, pytest.raises(PeerGone):
        client.request({"op": "hello"}, timeout=30)


# -- starting a worker ------------------------------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "loopback"), [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.2.1:*", True), ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True), ("ipc:///tmp/worker.sock", True), ("inproc://worker", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://192.168.1.5:5555", False),
    ("tcp://[::]:5555", False), ("tcp://eth0:5555", False), ("tcp://gpu.example.org:5555", False),
    ("tcp://127.0.0.1.example.org:5555", False),
])
def test_loopback_endpoints(endpoint: str, loopback: bool) -> None:
    assert is_loopback_endpoint(endpoint) is loopback


def worker_process(models: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_worker_beyond_loopback_without_keys_refuses_to_start_unless_insecure(models_dir: Path) -> None:
    refused = worker_process(models_dir, "--listen", "tcp://0.0.0.0:0")
    out, err = refused.communicate(timeout=120)
    assert refused.returncode != 0
    assert READY_PREFIX not in out
    assert "tcp://0.0.0.0:0" in err and "without CURVE" in err
    assert "diffsplit keys new" in err and "--insecure" in err
    started = worker_process(models_dir, "--listen", "tcp://0.0.0.0:0", "--insecure")
    try:
        line = started.stdout.readline()
        assert line.startswith(READY_PREFIX), line
        assert line[len(READY_PREFIX):].startswith("tcp://0.0.0.0:")
    finally:
        started.terminate()
        started.wait(30)


def test_a_worker_beyond_loopback_with_curve_starts(models_dir: Path, key_folder: Path) -> None:
    curve = ServerCurve(load_keypair(key_folder / "worker.key_secret"))
    check_worker_exposure("tcp://0.0.0.0:5555", curve, allow_upload=False, insecure=False)  # no error


def test_uploads_need_an_allow_list(models_dir: Path, key_folder: Path) -> None:
    anonymous_curve = ServerCurve(load_keypair(key_folder / "worker.key_secret"))  # no --curve-clients
    for listen, curve, insecure in [
        ("tcp://127.0.0.1:*", None, False),
        ("tcp://127.0.0.1:*", anonymous_curve, False),  # encrypted, but anyone with the public key
        ("tcp://0.0.0.0:*", anonymous_curve, True),  # --insecure lifts it on loopback only
        ("tcp://0.0.0.0:*", None, True),
    ]:
        config = WorkerConfig(models=models_dir, listen=listen, curve=curve, allow_upload=True,
                              insecure=insecure)
        with pytest.raises(InsecureWorker, match="--allow-upload needs an allow-list"):
            Worker(config)
    # the command line says the same in one line, before binding anything
    refused = worker_process(models_dir, "--listen", "tcp://127.0.0.1:0", "--allow-upload",
                             "--curve-secret", str(key_folder / "worker.key_secret"))
    out, err = refused.communicate(timeout=120)
    assert refused.returncode == 1 and READY_PREFIX not in out
    assert "--allow-upload needs an allow-list" in err and "--curve-clients" in err
    # --insecure on loopback is the documented way for a local, anonymous upload worker
    local = Served(WorkerConfig(models=models_dir, listen="tcp://127.0.0.1:*", allow_upload=True,
                                insecure=True, grace_s=1.0))
    local.close()


def test_curve_clients_without_a_secret_is_refused(models_dir: Path, key_folder: Path) -> None:
    refused = worker_process(models_dir, "--listen", "tcp://127.0.0.1:0",
                             "--curve-clients", str(key_folder / "clients"))
    out, err = refused.communicate(timeout=120)
    assert refused.returncode == 1 and READY_PREFIX not in out
    assert "--curve-clients needs --curve-secret" in err


def test_trust_code_needs_the_allow_list_even_when_insecure(models_dir: Path, key_folder: Path) -> None:
    curve = ServerCurve(load_keypair(key_folder / "worker.key_secret"))
    for chosen in (None, curve):
        with pytest.raises(Exception, match="--trust-code needs CURVE with an allow-list"):
            Worker(WorkerConfig(models=models_dir, listen="tcp://127.0.0.1:*", curve=chosen,
                                trust_code=True, insecure=True))


def test_uploads_come_only_from_allow_listed_clients(key_folder: Path, tmp_path: Path) -> None:
    store = tmp_path / "worker-models"
    (store / "checkpoints").mkdir(parents=True)
    served = serve_with_keys(store, key_folder)
    try:
        upload_as_each_client(served.address, key_folder, store)
    finally:
        served.close()


def upload_as_each_client(address: str, key_folder: Path, store: Path) -> None:
    """A stranger's and a plain client's upload get nothing (no handshake); alice's is installed."""
    data = b"not a model, but a file"
    chunk = {"op": "upload", "folder": "checkpoints", "name": "uploaded.safetensors",
             "sha256": hashlib.sha256(data).hexdigest(), "total_bytes": len(data), "offset": 0,
             "data": torch.frombuffer(bytearray(data), dtype=torch.uint8), "final": True}
    target = store / "checkpoints" / "uploaded.safetensors"
    anonymous = client_curve(None, str(key_folder / "worker.key"))  # a fresh key: encrypted, unknown
    with Client(address, settings=FAST, curve=anonymous) as client, pytest.raises(PeerGone):
        client.request(chunk, timeout=30)
    assert not target.exists()
    with Client(address, settings=FAST) as client, pytest.raises(PeerGone):  # plain text
        client.request(chunk, timeout=30)
    assert not target.exists()
    alice = client_curve(key_folder / "alice.key_secret", str(key_folder / "worker.key"))
    with Client(address, settings=FAST, curve=alice) as client:
        reply = client.request(chunk, timeout=30)
    assert reply["op"] == "result", reply
    assert target.read_bytes() == data


# -- client keys from flags and the environment ------------------------------------------------------


def test_client_keys_from_flags_win_over_the_environment(key_folder: Path, monkeypatch) -> None:
    monkeypatch.delenv(CLIENT_KEY_ENV, raising=False)
    monkeypatch.delenv(SERVER_KEY_ENV, raising=False)
    assert client_curve() is None
    worker_public = load_keypair(key_folder / "worker.key").public
    alice = load_keypair(key_folder / "alice.key_secret")
    monkeypatch.setenv(SERVER_KEY_ENV, str(key_folder / "alice.key"))
    monkeypatch.setenv(CLIENT_KEY_ENV, str(key_folder / "worker.key_secret"))
    from_env = client_curve()
    assert from_env is not None and from_env.server_public == alice.public
    from_flags = client_curve(key_folder / "alice.key_secret", str(key_folder / "worker.key"))
    assert from_flags is not None
    assert from_flags.server_public == worker_public and from_flags.keypair == alice


def test_bad_client_keys_are_clear_errors(key_folder: Path, monkeypatch) -> None:
    monkeypatch.delenv(CLIENT_KEY_ENV, raising=False)
    monkeypatch.delenv(SERVER_KEY_ENV, raising=False)
    with pytest.raises(TransportError, match="needs the worker's public key"):
        client_curve(key_folder / "alice.key_secret", None)
    with pytest.raises(TransportError, match="holds no secret key"):
        client_curve(key_folder / "alice.key", str(key_folder / "worker.key"))
    with pytest.raises(TransportError, match="neither a key file nor"):
        client_curve(None, "not-a-key")
    with pytest.raises(TransportError, match="cannot read CURVE key file"):
        client_curve(key_folder / "missing.key_secret", str(key_folder / "worker.key"))


@pytest.mark.parametrize("command", ["run", "profile", "plan"])
def test_every_client_command_takes_keys_and_a_heartbeat_timeout(command: str, key_folder: Path) -> None:
    args = build_parser().parse_args([
        command, "wf.json", "--models", "m", "--curve", str(key_folder / "alice.key_secret"),
        "--server-key", str(key_folder / "worker.key"), "--heartbeat-timeout", "1.5",
    ])
    options = client_options(args)
    assert options.curve is not None
    assert options.curve.server_public == load_keypair(key_folder / "worker.key").public
    assert options.settings.heartbeat_timeout == 1.5
    assert options.settings.heartbeat_interval < options.settings.heartbeat_timeout / 2


def test_clients_notice_a_dead_worker_within_about_three_seconds_by_default() -> None:
    # the client checks every beat: silent past the timeout, it is noticed at the next beat
    assert DEFAULT_SETTINGS.heartbeat_timeout + DEFAULT_SETTINGS.heartbeat_interval <= 3.0
    # a busy worker's I/O thread beats at least this often: many beats fit in a client's timeout
    worker_interval = WorkerConfig(models=Path(".")).settings.heartbeat_interval
    assert worker_interval * 4 <= DEFAULT_SETTINGS.heartbeat_timeout
    assert build_parser().parse_args(["worker", "--models", "m"]).heartbeat == worker_interval


def test_run_with_keys_offloads_to_a_curve_worker(curve_worker: Served, key_folder: Path, models_dir: Path,
                                                  tmp_path: Path, capsys) -> None:
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(sd15_workflow(lora=False, steps=2)))
    base = ["run", str(workflow), "--models", str(models_dir), "--remote", f"KSampler={curve_worker.address}",
            "--heartbeat-timeout", "1.5"]
    keys = ["--curve", str(key_folder / "alice.key_secret"), "--server-key", str(key_folder / "worker.key")]
    assert main([*base, "--out", str(tmp_path / "a"), "-q", *keys, "--stats", str(tmp_path / "s.json")]) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["nodes"]["6"]["where"] == "remote"
    assert stats["remote"]["6"]["address"] == curve_worker.address
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "b"), "-q"]) == 1  # no keys: the worker never answers
    error = capsys.readouterr().err
    assert curve_worker.address in error and "CURVE" in error


def _namespace_without_client_flags() -> argparse.Namespace:
    return argparse.Namespace()


def test_client_options_default_to_plain_and_default_settings(monkeypatch) -> None:
    monkeypatch.delenv(CLIENT_KEY_ENV, raising=False)
    monkeypatch.delenv(SERVER_KEY_ENV, raising=False)
    options = client_options(_namespace_without_client_flags())
    assert options.curve is None and options.settings == DEFAULT_SETTINGS
