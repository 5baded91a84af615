"""One model in one process: every request of the lab is a job queued to a single worker thread.

The model is loaded by the first job, so the server answers (with a status saying what it is doing) from its
first second; requests made while it loads or computes wait their turn. A job's :class:`LabError` (bad input)
travels back to the request that made it; a failed load turns every later job into that error.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future

from monet_jax.eval.lab.engine import Lab, LabError


class LabService:
    """Runs ``load`` (which builds the :class:`Lab`, reporting its steps through ``note``) and then the jobs,
    one at a time, in the order they came."""

    def __init__(self, load: Callable[[Callable[[str], None]], Lab]):
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.lab: Lab | None = None
        self.state, self.message, self.error = "loading", "starting", None
        self._since = time.monotonic()
        self._running: str | None = None
        self._waiting = 0
        self._thread = threading.Thread(target=self._work, args=(load,), name="expert-lab", daemon=True)
        self._thread.start()

    def status(self) -> dict:
        with self._lock:
            return {"state": self.state, "message": self.message, "running": self._running,
                    "waiting": self._waiting, "seconds": round(time.monotonic() - self._since, 1),
                    "error": self.error}

    def note(self, message: str) -> None:
        with self._lock:
            self.message, self._since = message, time.monotonic()

    def run(self, label: str, fn: Callable[[Lab], object], timeout: float | None = None):
        """``fn(lab)`` on the worker thread, after the jobs before it; its result, or its exception raised here."""
        future: Future = Future()
        with self._lock:
            self._waiting += 1
        self._jobs.put((label, fn, future))
        return future.result(timeout)

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until the model is loaded (an error if loading failed)."""
        self.run("wait", lambda lab: None, timeout)

    def _work(self, load) -> None:
        try:
            self.lab = load(self.note)
            with self._lock:
                self.state, self.message, self._since = "ready", "ready", time.monotonic()
        except Exception as e:  # the page shows why; the process stays up to say so
            with self._lock:
                self.state, self.error = "error", f"{type(e).__name__}: {e}" if not isinstance(e, LabError) else str(e)
                self.message = "the model could not be loaded"
            traceback.print_exc()
        while True:
            label, fn, future = self._jobs.get()
            with self._lock:
                self._waiting -= 1
                self._running, self._since = label, time.monotonic()
                if self.state == "ready":
                    self.state = "busy"
            try:
                if self.lab is None:
                    raise LabError(f"the model could not be loaded: {self.error}")
                future.set_result(fn(self.lab))
            except BaseException as e:
                future.set_exception(e)
            finally:
                with self._lock:
                    self._running = None
                    if self.state == "busy":
                        self.state = "ready"
