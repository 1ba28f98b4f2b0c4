"""Ray, for `skinscan batch` and `skinscan serve --replicas`: import it (an extra) and join or start a cluster."""

from __future__ import annotations

import logging
import os
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


def connect(address: str | None) -> Any:
    """Join the cluster at `address` (else RAY_ADDRESS), or start Ray on this machine; a clear error if the
    cluster cannot be reached."""
    ray = import_ray("running on Ray")
    if ray.is_initialized():
        return ray
    where = address or os.environ.get("RAY_ADDRESS")
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
