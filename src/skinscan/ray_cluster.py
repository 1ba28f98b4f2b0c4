"""Ray, for `skinscan batch` and `skinscan serve --replicas`: import it (an extra) and join or start a cluster."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from .errors import MissingExtra, SkinscanError


def import_ray(feature: str) -> Any:
    try:
        import ray
        import ray.data
        import ray.serve
    except ImportError as exc:
        raise MissingExtra("scale", feature, exc) from None
    return ray


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a HOST:PORT address does not answer (Ray retries for long)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or address in ("auto", "local"):
        return  # "auto", "local" and other forms: Ray resolves them
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise SkinscanError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}): check the address (`ray status` on "
            "the head node prints it); without --address and RAY_ADDRESS Ray runs on this machine"
        ) from None


def connect(address: str | None) -> Any:
    """Join the cluster at `address` (else RAY_ADDRESS), or start Ray on this machine; a clear error if the
    cluster cannot be reached."""
    ray = import_ray("running on Ray")
    if ray.is_initialized():
        return ray
    where = address or os.environ.get("RAY_ADDRESS")
    if where:
        _check_reachable(where)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as exc:
        raise SkinscanError(
            f"cannot join the Ray cluster at {where}: {exc}. Check the address (`ray status` on the head node "
            "prints it) and that this machine reaches it; without --address and RAY_ADDRESS Ray runs here."
            if where
            else f"cannot start Ray on this machine: {exc}"
        ) from None
    return ray
