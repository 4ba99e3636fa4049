"""Dynamic batching: a worker thread answers the requests that arrive close together in ONE batched
:func:`vllm2.chat.chat` call; with replicas (:mod:`.replicas`), one worker thread per replica, each forming its next
batch while the others compute.

The worker takes the oldest waiting job, then gathers more while they keep coming: a batch closes when ``wait_s``
passes without a new job, or at ``max_batch`` jobs (so a burst of requests that trickles in is not split, and a lone
request waits ``wait_s``). Requests the server is still reading (see :meth:`Batcher.arriving`) hold the batch open a
little longer (up to ``HOLD_WAITS * wait_s``). The jobs are grouped by sampling settings, one ``chat`` call per
group. Each job carries its own token budget and logit bias, so greedy answers equal those of the same requests sent
one at a time. A job whose client left before its batch started is skipped. If a batched call raises, its jobs run
again one at a time so the failure stays with the request that caused it. A replica whose process has ended
(:class:`.replicas.ReplicaGone`) retires: its worker thread puts its unanswered jobs back in the queue for the other
replicas and stops; when none is left, every waiting and later job fails with that error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from ..chat import ChatResult, chat
from .replicas import ReplicaGone

if TYPE_CHECKING:
    from ..modeling import VisionLLMv2Model
    from ..processor import VisionLLMv2Processor

__all__ = ["Batcher", "Job", "LogitBias"]

logger = logging.getLogger(__name__)

_STOP = object()
HOLD_WAITS = 10  # a batch waits at most this many wait_s for requests the server is still reading


@dataclass
class Job:
    """One request for the model: the last user message, earlier turns, its images and its decoding settings.

    ``temperature`` 0 means greedy decoding (``top_p`` then plays no part).
    """

    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    future: Future = field(default_factory=Future, repr=False, compare=False)

    @property
    def settings(self) -> tuple[float, float]:
        """The sampling settings jobs must share to run in one batch."""
        return (self.temperature, self.top_p) if self.temperature > 0 else (0.0, 1.0)


class LogitBias:
    """Logits processor adding each sample's bias (OpenAI ``logit_bias``) after an optional inner processor.

    Args:
        biases: per sample, token id -> value added to its logit.
        inner: applied first (e.g. a processor configured for the whole server).
    """

    def __init__(self, biases: list[dict[int, float]], inner: Callable | None = None) -> None:
        pairs = [(row, token, value) for row, bias in enumerate(biases) for token, value in bias.items()]
        self.rows = torch.tensor([p[0] for p in pairs], dtype=torch.long)  # [N]
        self.tokens = torch.tensor([p[1] for p in pairs], dtype=torch.long)  # [N]
        self.values = torch.tensor([p[2] for p in pairs], dtype=torch.float32)  # [N]
        self.inner = inner

    def __call__(self, sampled: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores if self.inner is None else self.inner(sampled, scores)  # [B, V]
        index = (self.rows.to(scores.device), self.tokens.to(scores.device))
        return scores.index_put(index, self.values.to(scores), accumulate=True)  # [B, V]


Runner = Callable[..., "list[ChatResult]"]  # the keyword arguments of ``chat`` after model and processor -> answers


class Batcher:
    """The worker threads and their queue.

    Args:
        model: the model (used by the worker thread only); None with ``replicas``.
        processor: its processor.
        max_batch: most jobs in one ``chat`` call.
        wait_s: a batch closes when this long passes without a new job.
        gen_kwargs: further ``chat`` options for every call (``logits_processor``, ``decoder_options``).
        replicas: runners that answer a batch elsewhere (:class:`.replicas.Replica`), one worker thread each; closed
            with the batcher. Default: the model, in this process.
    """

    def __init__(self, model: VisionLLMv2Model | None, processor: VisionLLMv2Processor, max_batch: int = 16,
                 wait_s: float = 0.01, gen_kwargs: dict[str, Any] | None = None,
                 replicas: Sequence[Runner] = ()) -> None:
        if max_batch < 1 or wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and wait_s >= 0, got {max_batch} and {wait_s}")
        if model is None and not replicas:
            raise ValueError("a batcher needs the model or its replicas")
        self.runners: list[Runner] = list(replicas) or [partial(chat, model, processor)]
        self.max_batch, self.wait_s = max_batch, wait_s
        self.gen_kwargs = dict(gen_kwargs or {})
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # the sizes of the latest chat calls
        self.runner_batches = [0] * len(self.runners)  # chat calls answered by each runner
        self.skipped = 0  # jobs whose client left before their batch started
        self.alive = [True] * len(self.runners)  # False once a runner's process has ended
        self._gone: ReplicaGone | None = None  # set when no runner is left
        self._queue: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"vllm2-batcher-{i}", daemon=True)
                         for i in range(len(self.runners))]
        self._closed = False
        self._arriving = 0  # requests being read that will submit a job
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Jobs waiting for a batch."""
        return len(self.queued())

    def queued(self) -> list[Job]:
        """A snapshot of the jobs waiting for a batch, oldest first."""
        return [item for item in list(self._queue.queue) if isinstance(item, Job)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request that is being read (before :meth:`submit`): a forming batch waits for it."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1

    def submit(self, job: Job) -> Future:
        """Queue a job; its future gets the :class:`ChatResult` (or the exception the model raised)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if self._gone is not None:
                raise RuntimeError(f"no model replica is left ({self._gone})")
            self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Refuse new jobs, answer every queued one, then stop the workers (and the replicas)."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(_STOP)
        for thread in self._threads:
            if thread.is_alive():
                thread.join()
        for runner in self.runners:
            getattr(runner, "close", lambda: None)()

    def _loop(self, index: int) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            jobs, stop = self._collect(item)
            try:
                if jobs:
                    self._run(jobs, index)
            except ReplicaGone as err:
                self._retire(index, [job for job in jobs if not job.future.done()], err)
                return
            if stop:
                return

    def _retire(self, index: int, jobs: list[Job], err: ReplicaGone) -> None:
        """Runner ``index`` is gone: its jobs go back to the queue for the others. They fail with ``err`` instead
        when the batcher is closing (the others stop at their marks) or when it was the last (the queued ones too)."""
        logger.error("replica %d is gone (%s) with %d jobs unanswered", index, err, len(jobs))
        with self._lock:
            self.alive[index] = False
            if any(self.alive) and not self._closed:
                for job in jobs:
                    self._queue.put(job)
                return
            if not any(self.alive):
                self._gone = err
                while not self._queue.empty():  # nobody is left to take them
                    item = self._queue.get_nowait()
                    jobs += [item] if isinstance(item, Job) else []
        for job in jobs:
            if job.future.running() or job.future.set_running_or_notify_cancel():
                job.future.set_exception(err)

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        """The jobs of one batch, starting with ``first``, and whether the stop mark was met."""
        jobs: list[Job] = []
        item: Any = first
        hold_until = time.monotonic() + HOLD_WAITS * self.wait_s
        while True:
            if item is _STOP:
                return jobs, True
            if item.future.running() or item.future.set_running_or_notify_cancel():  # running: a retired runner's job
                jobs.append(item)
            else:
                with self._lock:
                    self.skipped += 1
            if len(jobs) >= self.max_batch:
                return jobs, False
            item = self._next(hold_until)
            if item is None:
                return jobs, False

    def _next(self, hold_until: float) -> Any:
        """The next queued item within ``wait_s``; while requests are still being read, wait on (until
        ``hold_until``): they are already at the server. None when nothing comes."""
        while True:
            try:
                return self._queue.get(timeout=self.wait_s)
            except queue.Empty:
                if self._arriving == 0 or time.monotonic() >= hold_until:
                    return None

    def _run(self, jobs: list[Job], runner: int) -> None:
        """Answer the jobs with runner number ``runner``, one ``chat`` call per group of equal settings."""
        groups: dict[tuple[float, float], list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.settings, []).append(job)
        for group in groups.values():
            try:
                results = self._chat(group, runner)
            except ReplicaGone:
                raise
            except Exception as err:
                if len(group) == 1:
                    group[0].future.set_exception(err)
                    continue
                logger.warning("a batch of %d failed (%s): answering its requests one at a time", len(group), err)
                for job in group:
                    self._run([job], runner)
                continue
            for job, result in zip(group, results):
                job.future.set_result(result)

    def _chat(self, jobs: list[Job], runner: int) -> list[ChatResult]:
        """One batched ``chat`` call for jobs with the same settings."""
        self.batch_sizes.append(len(jobs))
        self.runner_batches[runner] += 1
        kwargs = dict(self.gen_kwargs)
        processor = kwargs.pop("logits_processor", None)
        if any(job.logit_bias for job in jobs):
            processor = LogitBias([job.logit_bias for job in jobs], processor)
        temperature, top_p = jobs[0].settings
        start = time.perf_counter()
        answer = self.runners[runner]
        results = answer(images=[job.images or None for job in jobs], prompts=[job.prompt for job in jobs],
                         history=[job.history for job in jobs], max_new_tokens=[job.max_tokens for job in jobs],
                         do_sample=temperature > 0, temperature=temperature or 1.0, top_p=top_p,
                         logits_processor=processor, **kwargs)
        logger.info("answered a batch of %d in %.3f s", len(jobs), time.perf_counter() - start)
        return results
