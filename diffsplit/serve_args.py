"""The arguments of ``diffsplit serve`` beyond a worker's own: where Ray is, how replicas are laid out."""

from __future__ import annotations

import argparse

from diffsplit.arg_types import positive_float, positive_int


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray`` and the replica settings (the worker flags are added beside them)."""
    group = parser.add_argument_group("on Ray Serve (pip install 'diffsplit[ray]')")
    group.add_argument("--ray", required=True, metavar="ADDRESS",
                       help="the Ray cluster: local (start a Ray instance in this process), auto (the "
                       "running cluster) or a cluster address")
    group.add_argument("--replicas", type=positive_int, default=1, metavar="N",
                       help="worker replicas (default 1); each runs --slots nodes at once")
    group.add_argument("--replica-gpus", type=positive_float, default=None, metavar="F",
                       help="GPUs per replica (default 0: the CPU; fractions share a GPU)")
    group.add_argument("--replica-cpus", type=positive_float, default=1.0, metavar="F",
                       help="logical CPUs per replica (default 1)")
    group.add_argument("--models-per-replica", type=positive_int, default=4, metavar="N",
                       help="recipe digests one replica is known to hold at once; requests for one of them "
                       "go to that replica first (Serve's model multiplexing; default 4)")
    group.add_argument("--ray-cpus", type=positive_int, default=None, metavar="N",
                       help="logical CPUs of a --ray local instance (default: this machine's cores)")
