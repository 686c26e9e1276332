"""The open-file limit, fitted to a bound on client connections (both doors)."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 1000
# Descriptors a door needs besides its clients': stdio, the listener, the event loop,
# Redis connections, the metrics server's clients.
FD_RESERVE = 64


def fit_to_open_file_limit(max_connections: int) -> int:
    """`max_connections` if the open-file limit allows that many connections besides
    FD_RESERVE, raising the soft limit toward the hard one if need be; otherwise as
    many as the limit allows, with a warning."""
    needed = max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return max_connections
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, error)
        else:
            log.info(
                "raised the open-file limit from %d to %d for --max-connections %d",
                soft,
                target,
                max_connections,
            )
            soft = target
    if needed <= soft:
        return max_connections
    fitted = max(1, soft - FD_RESERVE)
    log.warning(
        "--max-connections %d needs %d open files, over the limit of %d (hard limit %s): "
        "serving at most %d connections",
        max_connections,
        needed,
        soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
        fitted,
    )
    return fitted
