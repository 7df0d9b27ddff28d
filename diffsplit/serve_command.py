"""``diffsplit serve --ray``: start the Serve application, then take clients on ``--listen`` until stopped."""

from __future__ import annotations

import argparse
import dataclasses

from diffsplit.remote.errors import BadRequest


def serve_command(args: argparse.Namespace) -> int:
    """Deploy the replicas on Ray, run the front until SIGTERM/SIGINT, then remove the application."""
    from diffsplit.commands import run_daemon, worker_config
    from diffsplit.ray_connect import ray_session
    from diffsplit.remote.exposure import check_worker_exposure
    from diffsplit.remote.log_format import configure_worker_logging

    configure_worker_logging(json_lines=getattr(args, "log_json", False))
    config = worker_config(args)
    if config.allow_upload or config.trust_code:
        raise BadRequest("serve --ray takes no uploads and no code (--allow-upload, --trust-code): each "
                         "replica serves its own --models; run a diffsplit worker for those")
    # a --listen beyond loopback without CURVE is refused here, before any replica is deployed
    check_worker_exposure(config.listen, config.curve, allow_upload=False, insecure=config.insecure)
    with ray_session(args.ray, local_cpus=args.ray_cpus):
        from diffsplit.ray_serve import (
            ServeForwarder,
            ServeLayout,
            application_name,
            start_application,
            stop_application,
        )
        from diffsplit.remote.worker import Worker

        layout = ServeLayout(replicas=args.replicas, cpus_per_replica=args.replica_cpus,
                             gpus_per_replica=args.replica_gpus or 0.0,
                             models_per_replica=args.models_per_replica)
        name = application_name()
        try:
            handle = start_application(name, config, layout)
            # the front builds no model and computes nothing (no device of its own): it queues fairly and
            # forwards, as many at once as the replicas can take, so each replica can gather a batch
            forwards = layout.replicas * config.slots * config.batch_max
            front = dataclasses.replace(config, batch_max=1, index_at_start=False, hf_cache=None,
                                        cache_bytes=0, device="cpu", vram_bytes=None, slots=forwards)
            daemon = Worker(front, forward=ServeForwarder(handle, config.settings.limits))
            return run_daemon(daemon, f"diffsplit serve listening on {daemon.endpoint} ({layout.replicas} "
                              f"replica(s) on Ray as {name}; models: {config.models})", name="serve")
        finally:
            stop_application(name)
