"""Several processes: joining a run, and the host-side agreements the loops need.

``initialize`` takes, in this order, explicit arguments (the ``--coordinator/--num-processes/--process-id``
flags), the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or
what JAX detects on a TPU pod, under SLURM or under Open MPI. A process that cannot reach the coordinator
fails after ``timeout_s``; a process that dies later is noticed by the others within about ``heartbeat_s``
(JAX's coordination service then ends them with an error instead of letting them wait forever).

Every helper here is a collective: all processes must call it, in the same order.
"""

from __future__ import annotations

import os
import socket
import time

import jax
import numpy as np

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


class DistributedError(RuntimeError):
    """A multi-process run could not start (one line, names what is missing or unreachable)."""


def _from_env(name: str, value):
    if value is not None:
        return value
    raw = os.environ.get(ENV[name])
    if raw is None or raw == "":
        return None
    if name == "coordinator":
        return raw
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{ENV[name]}={raw!r} is not an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 300, heartbeat_s: int = 100) -> None:
    """Join the run (``jax.distributed.initialize``) with one-line errors and bounded waits."""
    given = {"coordinator": _from_env("coordinator", coordinator),
             "num_processes": _from_env("num_processes", num_processes),
             "process_id": _from_env("process_id", process_id)}
    explicit = {k: v for k, v in given.items() if v is not None}
    if explicit and len(explicit) < 3:
        missing = [f"--{k.replace('_', '-')} / {ENV[k]}" for k in given if given[k] is None]
        raise DistributedError(f"a multi-process launch needs the coordinator, the number of processes and this "
                               f"process's id; missing: {', '.join(missing)}")
    if explicit:
        n, i = given["num_processes"], given["process_id"]
        if n < 1 or not 0 <= i < n:
            raise DistributedError(f"process id {i} is not in [0, {n}) for {n} processes")
        if ":" not in given["coordinator"]:
            raise DistributedError(f"coordinator {given['coordinator']!r} must be HOST:PORT")
    if timeout_s < 1 or heartbeat_s < 1:
        raise DistributedError("timeouts must be at least one second")
    where = (f"coordinator {given['coordinator']} as process {given['process_id']} of {given['num_processes']}"
             if explicit else "the cluster")
    if explicit:  # JAX ends the process without a Python error when it cannot connect: check first
        _check_coordinator(given["coordinator"], given["process_id"], timeout_s, where)
    try:
        jax.distributed.initialize(given["coordinator"], given["num_processes"], given["process_id"],
                                   initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_s)
    except ValueError as e:  # nothing detected and nothing given
        if explicit:
            raise DistributedError(f"cannot join {where}: {_first_line(e)}") from None
        raise DistributedError("no TPU pod, SLURM or Open MPI job detected: pass --coordinator HOST:PORT "
                               "--num-processes N --process-id I (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                               "JAX_PROCESS_ID)") from None
    except Exception as e:  # noqa: BLE001 -- the runtime raises its own types (deadline exceeded, unavailable)
        raise DistributedError(f"cannot join {where} within {timeout_s}s: {_first_line(e)}") from None


def _check_coordinator(address: str, process_id: int, timeout_s: float, where: str) -> None:
    """Process 0 must be able to bind the port; the others must reach it within ``timeout_s``."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port)
    except ValueError:
        raise DistributedError(f"coordinator {address!r} must be HOST:PORT") from None
    if process_id == 0:
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", port))
        except OSError as e:
            raise DistributedError(f"cannot start the coordinator on port {port}: {e.strerror or e}") from None
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(f"cannot join {where}: no coordinator answered at {address} within "
                                       f"{timeout_s:g}s ({e.strerror or e})") from None
            time.sleep(0.5)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def add_launch_args(p) -> None:
    """``--distributed`` and the explicit launch flags (an ``argparse`` parser), for every entry point."""
    g = p.add_argument_group("several processes (TPU pods, GPU clusters, several hosts)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run: TPU pods, SLURM and Open MPI are detected; otherwise the flags "
                        "below or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (implies --distributed)")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (implies --distributed)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (implies --distributed)")
    g.add_argument("--init-timeout", type=int, default=300, metavar="S",
                   help="seconds to wait for the coordinator and the other processes (default 300)")
    g.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                   help="seconds after which a silent process counts as dead and the run ends (default 100)")


def launch(args) -> bool:
    """Join the multi-process run that parsed ``args`` (see :func:`add_launch_args`) ask for; True if joined."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not (args.distributed or any(v is not None for v in explicit)):
        return False
    initialize(*explicit, timeout_s=args.init_timeout, heartbeat_s=args.heartbeat_timeout)
    return True


def abandon(prog: str, error: BaseException) -> None:
    """End this process at once after a failure in a multi-process run (typically a collective that failed
    because another process died): one line on stderr and exit status 3, without waiting in JAX's shutdown
    barrier for processes that will never arrive."""
    import sys

    print(f"{prog}: error: process {jax.process_index()} of {jax.process_count()} stopped: {_first_line(error)} "
          f"(another process has probably died; its log says why). Checkpoints already written are intact: run "
          f"the same command to resume.", file=sys.stderr, flush=True)
    os._exit(3)


def agree(flag: bool, how: str = "any") -> bool:
    """``any`` / ``all`` of ``flag`` over the processes (collective; a plain bool with one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array(bool(flag)))
    return bool(np.any(flags) if how == "any" else np.all(flags))


def barrier(name: str) -> None:
    """Wait until every process got here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def sum_over_processes(values) -> np.ndarray:
    """Element-wise float64 sum of a vector over the processes (each contributes its own)."""
    values = np.asarray(values, np.float64).reshape(-1)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    hi = values.astype(np.float32)  # devices hold float32: send each value as two float32 parts
    lo = (values - hi.astype(np.float64)).astype(np.float32)
    parts = np.asarray(multihost_utils.process_allgather(np.stack([hi, lo]))).astype(np.float64)
    return parts.reshape(jax.process_count(), 2, -1).sum(axis=(0, 1))
