"""Model replicas in worker processes (``vllm2 serve --replicas N``): N batches answered at once, one per process.

One process holds one copy of the model and answers one batched :func:`vllm2.chat.chat` call at a time, so a server
gives each replica its share of the cores: the batcher gives each replica a worker thread that forms batches while the
other replicas compute, and waiting on a replica's pipe leaves the server's own process free for HTTP. Replicas load
the same weights, so every answer equals the in-process one. A call that raises in the replica raises
:class:`ReplicaError` with its message in the server, and the replica answers the next call; a replica that died
raises :class:`ReplicaGone` (the batcher then gives its jobs to the other replicas).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..chat import ChatResult
    from ..modeling import VisionLLMv2Model
    from ..processor import VisionLLMv2Processor

__all__ = ["Replica", "ReplicaError", "ReplicaGone"]

Loader = Callable[[], "tuple[VisionLLMv2Model, VisionLLMv2Processor]"]  # picklable: runs in the replica


class ReplicaError(RuntimeError):
    """A replica's call failed (the message is the replica's exception), or the replica is gone."""


class ReplicaGone(ReplicaError):
    """The replica's process has ended: no later call can succeed."""


def _serve(load: Loader, conn: Any, threads: int | None) -> None:
    """The replica process: load the model, then answer ``chat`` keyword arguments until ``None`` comes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server shuts replicas down
    import torch

    from ..chat import chat

    if threads is not None:
        torch.set_num_threads(threads)

    try:
        model, processor = load()
    except Exception as err:  # reported to the server, which refuses to start
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            kwargs = conn.recv()
        except EOFError:  # the server is gone
            return
        if kwargs is None:
            return
        try:
            conn.send(("ok", chat(model, processor, **kwargs)))
        except Exception as err:
            conn.send(("error", f"{type(err).__name__}: {err}"))


class Replica:
    """One model copy in a spawned process; calling it answers one batch (the keyword arguments of ``chat``).

    Args:
        load: returns the model (in eval mode) and its processor; must pickle (a module-level function or a
            ``functools.partial`` of one).
        threads: torch's thread count in the replica (default: torch's own, from ``OMP_NUM_THREADS`` or the cores).
    """

    def __init__(self, load: Loader, threads: int | None = None) -> None:
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(load, child, threads), name="vllm2-replica",
                                        daemon=True)
        self._process.start()
        child.close()
        self._ready = False

    def wait_ready(self) -> None:
        """Block until the model is loaded; raise :class:`ReplicaError` if loading failed."""
        if not self._ready:
            self._receive()
            self._ready = True

    def __call__(self, **kwargs: Any) -> list[ChatResult]:
        """Answer one batch: the keyword arguments of :func:`vllm2.chat.chat` after the model and processor."""
        self.wait_ready()
        try:
            self._conn.send(kwargs)
        except (BrokenPipeError, OSError) as err:
            raise ReplicaGone(f"replica process {self._process.pid} is gone ({err})") from None
        return self._receive()

    def _receive(self) -> Any:
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError):
            raise ReplicaGone(f"replica process {self._process.pid} is gone (exit code "
                               f"{self._process.exitcode})") from None
        if status == "error":
            raise ReplicaError(payload)
        return payload

    def close(self) -> None:
        """Stop the process (after the call in progress, if any)."""
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()
