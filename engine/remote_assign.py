"""Which nodes of a workflow run on which worker.

A node runs remotely when the workflow labels it (``_meta.remote`` in the API
format, the ``diffsplit.remote`` property in the UI format) or the command line
does (``--remote 12=tcp://host:5555`` by node id, ``--remote KSampler=...`` by
class). The command line wins over labels; a node id wins over a class name.

An assignment may name several workers, comma-separated
(``--remote KSampler=tcp://a:5555,tcp://b:5555``): the node goes to one that holds its
models, else the least loaded (``engine.worker_choice``), and to the next when one is
gone or overloaded (``engine.offload``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.graph import Workflow
from diffsplit.engine.nodes.registry import NodeRegistry

_SCHEMES = ("tcp://", "ipc://", "inproc://")
#: Separates the workers of one assignment.
WORKER_SEPARATOR = ","


def parse_remote_option(text: str) -> tuple[str, str]:
    """``"NODE=ADDR"`` → ``(NODE, ADDR)``; NODE is a node id or a class name, ADDR one or more workers."""
    target, separator, address = text.partition("=")
    target, address = target.strip(), address.strip()
    if not separator or not target or not address:
        raise WorkflowError(f"--remote {text!r} is not of the form NODE=ADDR (e.g. KSampler=tcp://gpu:5555)")
    address = WORKER_SEPARATOR.join(worker_addresses(address, f"--remote {text!r}"))
    return target, address


def check_address(address: str, where: str) -> None:
    """A worker address must be a ZeroMQ endpoint such as ``tcp://host:5555``."""
    if WORKER_SEPARATOR in address:
        raise WorkflowError(f"{where}: {address!r} is a list of workers; one worker address goes here")
    if not address.startswith(_SCHEMES):
        schemes = ", ".join(_SCHEMES)
        shown = repr(address) if address else "an empty entry"
        raise WorkflowError(f"{where}: worker address {shown} must start with one of {schemes}")


def worker_addresses(spec: str, where: str = "worker address") -> tuple[str, ...]:
    """The workers of one assignment, in the order they are tried: ``"tcp://a:1,tcp://b:2"`` → both."""
    addresses = tuple(part.strip() for part in spec.split(WORKER_SEPARATOR))
    for address in addresses:
        check_address(address, where)
    if len(set(addresses)) != len(addresses):
        raise WorkflowError(f"{where}: {spec!r} names a worker twice")
    return addresses


def assign_remotes(
    workflow: Workflow, registry: NodeRegistry, options: Iterable[str] = ()
) -> dict[str, str]:
    """Node id → worker address for every node that runs remotely."""
    by_id: dict[str, str] = {}
    by_class: dict[str, str] = {}
    for text in options:
        target, address = parse_remote_option(text)
        if target in workflow.nodes:
            by_id[target] = address
        elif target in registry:
            by_class[target] = address
        else:
            raise WorkflowError(
                f"--remote {text!r}: {target!r} is neither a node id of this workflow nor a node class"
            )
    if by_class and not any(node.class_type in by_class for node in workflow.nodes.values()):
        names = ", ".join(sorted(by_class))
        raise WorkflowError(f"--remote: the workflow has no node of class {names}")
    assigned: dict[str, str] = {}
    for node_id, node in workflow.nodes.items():
        address = by_id.get(node_id) or by_class.get(node.class_type) or node.remote
        if address is None:
            continue
        address = WORKER_SEPARATOR.join(worker_addresses(address, f"node {node_id} ({node.class_type})"))
        node_class = registry.get(node.class_type)
        if node_class.output_node or node_class.is_loader:
            kind = "an output node" if node_class.output_node else "a loader"
            if node_id in by_id or node.remote:
                raise WorkflowError(
                    f"{kind} runs where its results are used, not on a worker",
                    node_id=node_id, class_type=node.class_type,
                )
            continue  # a class-wide --remote simply skips such nodes
        assigned[node_id] = address
    return assigned


def describe_assignment(assigned: Mapping[str, str], workflow: Workflow) -> str:
    """One line per remote node, for progress output."""
    return "\n".join(
        f"  node {node_id:>4} {workflow.node(node_id).class_type:<28} -> "
        + ", then ".join(worker_addresses(address))
        for node_id, address in sorted(assigned.items())
    )
