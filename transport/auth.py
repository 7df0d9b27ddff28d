"""CURVE keys and socket setup.

CURVE encrypts a connection and proves the server's identity to the client
(the client must know the server's public key). It proves a *client's*
identity only when the server checks client keys against an allow-list; only
then is a connection "authenticated" (``ServerCurve.authenticates_clients``,
``Request.client_key``). cloudpickle'd user code may only ever be accepted over
such an authenticated connection, by a worker started with ``--trust-code``;
this module provides the information, the worker makes that decision.

Key files use pyzmq's format (``zmq.auth.load_certificate`` reads them):
``NAME.key`` holds the public key, ``NAME.key_secret`` both (mode 0600).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from diffsplit.transport.errors import TransportError
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, both Z85-encoded (40 bytes); ``secret`` is None for a public-only key."""

    public: bytes
    secret: bytes | None = None

    def __repr__(self) -> str:  # never print a secret key
        return f"KeyPair(public={self.public!r}, secret={'<hidden>' if self.secret else None})"


def generate_keypair() -> KeyPair:
    """A fresh CURVE key pair."""
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


def save_keypair(
    keypair: KeyPair, directory: str | os.PathLike[str], name: str, *, overwrite: bool = True
) -> tuple[Path, Path | None]:
    """Write ``NAME.key`` (public) and, if there is a secret, ``NAME.key_secret`` (mode 0600).

    With ``overwrite=False`` nothing is written when either file exists (FileExistsError).
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public_path = folder / f"{name}.key"
    secret_path = folder / f"{name}.key_secret" if keypair.secret is not None else None
    if not overwrite:
        for path in (public_path, secret_path):
            if path is not None and (path.exists() or path.is_symlink()):
                raise FileExistsError(errno.EEXIST, "key file exists; not overwritten", str(path))
    exclusive = 0 if overwrite else os.O_EXCL
    if secret_path is not None:  # the secret first: a failure leaves no lone public key behind
        _write_private(secret_path, _certificate(keypair.public, keypair.secret), exclusive)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | exclusive
    fd = os.open(public_path, flags, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(_certificate(keypair.public, None))
    return public_path, secret_path


def _write_private(path: Path, text: str, exclusive: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | exclusive, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT otherwise
        fh.write(text)


def _certificate(public: bytes, secret: bytes | None) -> str:
    lines = [
        "#   ZeroMQ CURVE certificate written by diffsplit",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def load_keypair(path: str | os.PathLike[str]) -> KeyPair:
    """Read a key file (``.key`` gives a public-only pair, ``.key_secret`` a full one)."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot read CURVE key file {os.fspath(path)!r}: {exc}") from exc
    return KeyPair(public, secret)


def load_public_keys(directory: str | os.PathLike[str]) -> frozenset[bytes]:
    """The public keys of every ``*.key`` file in a folder (an allow-list of clients)."""
    return frozenset(load_keypair(p).public for p in sorted(Path(directory).glob("*.key")))


@dataclass(frozen=True)
class ServerCurve:
    """CURVE for a server: its key pair and, optionally, the client keys it accepts.

    With ``allowed_clients=None`` any client may connect (encrypted, but the
    client is anonymous); with a set, only those keys complete the handshake.
    """

    keypair: KeyPair
    allowed_clients: frozenset[bytes] | None = None

    @property
    def authenticates_clients(self) -> bool:
        return self.allowed_clients is not None


@dataclass(frozen=True)
class ClientCurve:
    """CURVE for a client: the server's public key and the client's own pair (fresh if None)."""

    server_public: bytes
    keypair: KeyPair | None = None


class _AllowList:
    def __init__(self, keys: Iterable[bytes]) -> None:
        self._keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._keys


def configure_server(sock: zmq.Socket[Any], curve: ServerCurve, context: zmq.Context[Any]) -> Any:
    """Make ``sock`` a CURVE server (call before bind).

    With an allow-list this starts a ZAP authenticator thread on ``context``
    (one per context) and returns it; the caller stops it (``.stop()``) after
    closing the socket. Returns None otherwise.
    """
    if curve.keypair.secret is None:
        raise TransportError("a CURVE server needs its secret key")
    authenticator = None
    if curve.allowed_clients is not None:
        authenticator = ThreadAuthenticator(context)
        authenticator.start()
        authenticator.configure_curve_callback("*", credentials_provider=_AllowList(curve.allowed_clients))
    sock.curve_secretkey = curve.keypair.secret
    sock.curve_publickey = curve.keypair.public
    sock.curve_server = True
    return authenticator


def configure_client(sock: zmq.Socket[Any], curve: ClientCurve) -> KeyPair:
    """Make ``sock`` a CURVE client of the server with ``curve.server_public`` (call before connect)."""
    keypair = curve.keypair or generate_keypair()
    if keypair.secret is None:
        raise TransportError("a CURVE client needs its secret key")
    sock.curve_secretkey = keypair.secret
    sock.curve_publickey = keypair.public
    sock.curve_serverkey = curve.server_public
    return keypair


#: Environment variables a client reads its CURVE keys from (flags win over them).
SERVER_KEY_ENV = "DIFFSPLIT_CURVE_SERVER_KEY"
CLIENT_KEY_ENV = "DIFFSPLIT_CURVE_CLIENT_KEY"
_Z85_KEY_LENGTH = 40


def load_server_key(text: str) -> bytes:
    """A server's public key from a key file (``.key`` or ``.key_secret``) or its 40-character Z85 text."""
    path = Path(text).expanduser()
    if path.is_file():
        return load_keypair(path).public
    if len(text) == _Z85_KEY_LENGTH:
        try:
            if len(z85.decode(text.encode("ascii"))) == 32:
                return text.encode("ascii")
        except (ValueError, UnicodeEncodeError):
            pass
    raise TransportError(
        f"the server key {text!r} is neither a key file nor a 40-character Z85 public key "
        "(give the worker's NAME.key file, written by `diffsplit keys new NAME`)"
    )


def client_curve(
    client_secret: str | os.PathLike[str] | None = None, server_key: str | None = None
) -> ClientCurve | None:
    """A client's CURVE from ``--curve FILE`` / ``--server-key KEY``, each else from its environment variable.

    ``client_secret`` is this client's ``.key_secret`` file (``DIFFSPLIT_CURVE_CLIENT_KEY``),
    ``server_key`` the worker's public key, a file or Z85 text (``DIFFSPLIT_CURVE_SERVER_KEY``).
    None when neither is given (a plain connection); a server key alone gives a fresh,
    anonymous client key (encrypted, but a worker with an allow-list refuses it); a
    client key without a server key is an error (CURVE cannot work without it).
    """
    secret = os.fspath(client_secret) if client_secret else os.environ.get(CLIENT_KEY_ENV) or None
    server = server_key or os.environ.get(SERVER_KEY_ENV) or None
    if server is None:
        if secret is not None:
            raise TransportError(
                f"a client CURVE key ({secret!r}) needs the worker's public key too: give --server-key "
                f"WORKER.key (or set {SERVER_KEY_ENV})"
            )
        return None
    keypair = None
    if secret is not None:
        keypair = load_keypair(secret)
        if keypair.secret is None:
            raise TransportError(
                f"{secret!r} holds no secret key: a client needs its own NAME.key_secret file "
                "(written by `diffsplit keys new NAME`)"
            )
    return ClientCurve(server_public=load_server_key(server), keypair=keypair)


def client_curve_from_environment() -> ClientCurve | None:
    """CURVE keys named by ``DIFFSPLIT_CURVE_SERVER_KEY`` (the worker's public ``.key`` file or Z85 key)
    and ``DIFFSPLIT_CURVE_CLIENT_KEY`` (this client's ``.key_secret`` file); see :func:`client_curve`."""
    return client_curve(None, None)
