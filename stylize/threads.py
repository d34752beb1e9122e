"""The two thread shapes the run uses, written once: a worker fed in order (`Pipe`: the engine's
hand-back, the encoder) and a producer read in order (`produce`: the decoder).

Both keep an exception raised on their thread and raise it on the caller's thread, at its next
call; neither ever leaves a thread running after it is closed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()


class Pipe(Generic[T]):
    """`put(item)` on the caller's thread, `handle(item)` on the pipe's own thread, in order.

    `put` returns once fewer than `limit` of the items put are still unhandled (None: it never
    waits): the caller runs at most `limit` items ahead of the worker. After an exception in
    `handle`, the items left are skipped and the exception is raised by the next `put`, `join` or
    `close`; the pipe then works again (a new clip may start on it)."""

    def __init__(self, handle: Callable[[T], None], name: str, limit: int | None = None):
        self.handle, self.limit = handle, limit
        self.queue: queue.Queue = queue.Queue()
        self.unhandled = 0
        self.changed = threading.Condition()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def put(self, item: T) -> None:
        self._raise()
        with self.changed:
            self.unhandled += 1
        self.queue.put(item)
        if self.limit is not None:
            with self.changed:  # backpressure: wait for the worker to catch up
                self.changed.wait_for(lambda: self.unhandled < self.limit or self.error is not None)
        self._raise()

    def join(self) -> None:
        """Wait until every item put so far has been handled (or skipped after an error)."""
        with self.changed:
            self.changed.wait_for(lambda: self.unhandled == 0)
        self._raise()

    def close(self, discard: bool = False) -> None:
        """End the thread after the items put so far (skipped with `discard`); raise its error
        unless discarding (the caller is already failing)."""
        if self.thread is None:
            return
        if discard:
            self.error = self.error or _Discarded()
        self.queue.put(_END)
        self.thread.join()
        self.thread = None
        if not discard:
            self._raise()

    def _work(self) -> None:
        while (item := self.queue.get()) is not _END:
            try:
                if self.error is None:
                    self.handle(item)
            except BaseException as e:  # noqa: BLE001 - raised on the caller's thread
                self.error = e
            finally:
                with self.changed:
                    self.unhandled -= 1
                    self.changed.notify_all()

    def _raise(self) -> None:
        with self.changed:
            error, self.error = self.error, None
            if error is not None:  # what was skipped after it is gone too
                self.changed.wait_for(lambda: self.unhandled == 0)
        if error is not None and not isinstance(error, _Discarded):
            raise error


class _Discarded(Exception):
    """Marks a pipe closed by a failing caller: what is left is skipped, nothing is raised."""


def produce(generate: Callable[[threading.Event], Iterator[T]], name: str, ahead: int = 1) -> Iterator[T]:
    """The items of `generate(stop)`, made on a thread of their own and handed over in order.

    The generator is resumed for the next item only while fewer than `ahead` items wait untaken
    (an item made and then held would only age). Closing the iterator (close(), break, an error)
    sets `stop`, which `generate` checks between pieces of work, and joins the thread."""
    out: queue.Queue = queue.Queue()
    room = threading.Semaphore(ahead)
    stop = threading.Event()

    def wait_for_room() -> bool:
        while not stop.is_set():
            if room.acquire(timeout=0.1):
                return True
        return False

    def work() -> None:
        try:
            items = generate(stop)
            while wait_for_room():
                item = next(items, _END)
                out.put(item)
                if item is _END:
                    return
        except BaseException as e:  # noqa: BLE001 - raised on the consuming thread
            out.put(e)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            room.release()  # taken: the producer may start on the next one
            yield item
    finally:
        stop.set()  # noticed within 0.1 s, between pieces of work or while waiting for room
        thread.join()
