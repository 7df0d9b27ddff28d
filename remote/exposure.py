"""What a worker may be started with: safe by default, insecure only when asked for.

A worker that others can reach must know who they are:

- listening beyond this machine (anything but ``127.0.0.0/8``, ``::1``,
  ``localhost``, ``ipc://`` and ``inproc://``) needs CURVE (``--curve-secret``),
  unless ``--insecure`` says the network is trusted;
- ``--allow-upload`` writes clients' files into the store, so it needs an
  allow-list of client keys (``--curve-clients``); on a loopback endpoint
  ``--insecure`` lifts that (every local user may then upload), beyond
  loopback nothing does;
- ``--trust-code`` needs the allow-list, always (checked by the worker as before).
"""

from __future__ import annotations

import ipaddress

from diffsplit.remote.errors import BadRequest
from diffsplit.transport.auth import ServerCurve

_LOCAL_SCHEMES = ("ipc://", "inproc://")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
#: How to make keys, for the error messages.
KEYS_HOWTO = (
    "make a key pair with `diffsplit keys new worker` and start the worker with "
    "--curve-secret worker.key_secret; for client keys, `diffsplit keys new alice` on each client and "
    "--curve-clients DIR holding their .key files"
)


class InsecureWorker(BadRequest):
    """The worker would accept strangers' work, files or code without being told it may."""

    kind = "InsecureWorker"


def endpoint_host(endpoint: str) -> str | None:
    """The host part of a ``tcp://HOST:PORT`` endpoint (brackets of IPv6 removed); None for other schemes."""
    if not endpoint.startswith("tcp://"):
        return None
    rest = endpoint[len("tcp://"):]
    rest = rest.rpartition(";")[2]  # tcp://SOURCE;HOST:PORT names the peer last
    host = rest.rpartition(":")[0] if ":" in rest else rest
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether only this machine can reach ``endpoint`` (loopback TCP, ipc://, inproc://)."""
    if endpoint.startswith(_LOCAL_SCHEMES):
        return True
    host = endpoint_host(endpoint)
    if host is None or not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name: assume the network can reach it
        return False


def check_worker_exposure(
    listen: str, curve: ServerCurve | None, *, allow_upload: bool, insecure: bool
) -> None:
    """Raise InsecureWorker when the worker may not start this way (see the module's rules)."""
    local = is_loopback_endpoint(listen)
    if curve is None and not local and not insecure:
        raise InsecureWorker(
            f"refusing to listen on {listen} without CURVE: anyone who can reach it could use this "
            f"worker. {KEYS_HOWTO}; or listen on tcp://127.0.0.1:PORT; or give --insecure if this "
            "network is trusted"
        )
    authenticates = curve is not None and curve.authenticates_clients
    if allow_upload and not authenticates and not (local and insecure):
        where = "" if local else f" (on {listen}, beyond loopback, --insecure does not lift this)"
        raise InsecureWorker(
            "--allow-upload needs an allow-list of client keys (--curve-secret and --curve-clients): "
            f"uploads write into the models folder, so only known clients may send them{where}. "
            f"{KEYS_HOWTO}" + ("; or, on this loopback endpoint, give --insecure" if local else "")
        )
