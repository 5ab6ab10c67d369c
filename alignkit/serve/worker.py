"""The thread that owns the decoding scheduler, and the hand-off between it and the asyncio request handlers.

One thread calls `Scheduler.add`, `cancel` and `step`, so the scheduler needs no locks and a decode step never
waits on Python's event loop. Handlers never touch the scheduler: they put a `RequestHandle` in the inbox (or mark
it cancelled) and wake the thread; the thread admits it at the next step boundary and sends each step's events
back to the handle's `asyncio.Queue` with `loop.call_soon_threadsafe`, the only thread-safe way into a loop.

    handler --submit()--> inbox --(thread)--> scheduler.add --step()--> events --call_soon_threadsafe--> queue

Capacity is counted in sequences (a request with n = 4 holds four): at most `max_batch_size` decode together in the
scheduler, and up to `max_queue` more may wait; `submit` refuses beyond that (the API answers 429), so a burst of
clients cannot grow the backlog, and everyone's latency, without bound.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from alignkit.generation.sampling import SamplingParams

logger = logging.getLogger(__name__)


class SchedulerLike(Protocol):
    """What the worker needs from `alignkit.generation.scheduler.Scheduler` (tests substitute stand-ins)."""

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int: ...
    def cancel(self, request_id: int) -> None: ...
    def has_work(self) -> bool: ...
    def step(self) -> Sequence[Any]: ...


class QueueFull(Exception):
    """The server already holds as many sequences as it may; the client should retry later."""


class EngineFailed(Exception):
    """The scheduler raised while admitting or decoding this request."""


@dataclass(eq=False)
class RequestHandle:
    """One request between its handler (event-loop side) and the worker thread."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    # Each item is one step's events for this request (a list of TokenEvent), or an exception.
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    request_id: int | None = None
    finished_samples: set[int] = field(default_factory=set)
    done: bool = False
    cancelled: bool = False


class BatchWorker:
    """Runs `scheduler.step()` in a background thread while any request is waiting or decoding."""

    def __init__(self, scheduler: SchedulerLike, *, max_batch_size: int, max_queue: int) -> None:
        self.scheduler = scheduler
        self.capacity = max_batch_size + max_queue
        self._cond = threading.Condition()
        self._inbox: list[RequestHandle] = []
        self._cancels: list[RequestHandle] = []
        self._active: dict[int, RequestHandle] = {}
        self._held = 0  # sequences submitted and not yet finished or cancelled
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="alignkit-serve-worker", daemon=True)
        # Counters for /health and the tests.
        self.steps = 0
        self.completed = 0
        self.cancelled = 0

    # ------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def held(self) -> int:
        """Sequences waiting or decoding."""
        with self._cond:
            return self._held

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request for the next step boundary; raises QueueFull when the server is at capacity.

        Must be called from the event loop that will read the handle's queue."""
        handle = RequestHandle(prompt_ids, params, asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._held + params.n > self.capacity:
                raise QueueFull(f"{self._held} sequences are waiting or decoding (capacity {self.capacity})")
            self._held += params.n
            self._inbox.append(handle)
            self._cond.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Stop a request (client gone, timeout); its rows are freed at the next step. Idempotent."""
        with self._cond:
            if handle.done or handle.cancelled:
                return
            handle.cancelled = True
            self._cancels.append(handle)
            self._cond.notify()

    # ------------------------------------------------------------ worker thread

    def _release(self, handle: RequestHandle) -> None:
        """Give back a finished or cancelled request's capacity (under the lock)."""
        if not handle.done:
            handle.done = True
            self._held -= handle.params.n

    def _deliver(self, handle: RequestHandle, item: Any) -> None:
        try:
            handle.loop.call_soon_threadsafe(handle.queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop has closed (server shutdown): nobody is waiting for this answer any more

    def _run(self) -> None:
        busy = False
        while True:
            with self._cond:
                while not (self._inbox or self._cancels or busy or self._closed):
                    self._cond.wait()
                if self._closed:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                for handle in inbox:
                    if handle.cancelled:  # cancelled before it ever reached the scheduler
                        self._release(handle)
                        self.cancelled += 1
            for handle in cancels:
                if handle.request_id is not None and handle.request_id in self._active:
                    del self._active[handle.request_id]
                    self.scheduler.cancel(handle.request_id)
                    with self._cond:
                        self._release(handle)
                        self.cancelled += 1
            for handle in inbox:
                if handle.done:
                    continue
                try:
                    handle.request_id = self.scheduler.add(handle.prompt_ids, handle.params)
                except Exception as e:  # a prompt the API's checks let through: fail this request only
                    with self._cond:
                        self._release(handle)
                    self._deliver(handle, EngineFailed(str(e)))
                    continue
                self._active[handle.request_id] = handle
            busy = self.scheduler.has_work()
            if busy:
                self._step()
                busy = self.scheduler.has_work()
        # Stopped: the scheduler unpacks its weights and restores the model (from this thread, which owns it).
        close = getattr(self.scheduler, "close", None)
        if close is not None:
            close()

    def _step(self) -> None:
        try:
            events = self.scheduler.step()
        except Exception as e:
            # The scheduler's state is unknown after a failed step: fail every request it holds (logged with the
            # traceback, as this is a bug) and let new requests start afresh.
            logger.exception("the decode step failed; failing the requests in the batch")
            for request_id, handle in list(self._active.items()):
                try:
                    self.scheduler.cancel(request_id)
                except Exception:
                    pass
                with self._cond:
                    self._release(handle)
                self._deliver(handle, EngineFailed(f"the decode step failed: {e}"))
            self._active.clear()
            return
        self.steps += 1
        grouped: dict[int, list[Any]] = {}
        for event in events:
            grouped.setdefault(event.request_id, []).append(event)
        for request_id, batch in grouped.items():
            handle = self._active.get(request_id)
            if handle is None:
                continue  # cancelled during this step
            for event in batch:
                if event.finish_reason is not None:
                    handle.finished_samples.add(event.sample_index)
            self._deliver(handle, batch)
            if len(handle.finished_samples) == handle.params.n:
                del self._active[request_id]
                with self._cond:
                    self._release(handle)
                    self.completed += 1
