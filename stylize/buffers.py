"""A small ring of batch-sized host buffers that the decoder fills and the stylizer uploads from.

On CUDA they are pinned, so the upload is a true asynchronous copy and the feeding thread does no
pinning or padding of its own; the decoder writes each frame straight into place. A slot goes
back to the ring (`release(after=upload_event)`) once the stylizer no longer reads it on the host
(its flows and reference frame are taken); it is refilled only after that event has fired.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(eq=False)
class Slot:
    """One buffer: `array` uint8 (B, H, W, 3) and `tensor`, the same memory as a torch tensor."""

    ring: HostRing
    array: np.ndarray
    tensor: torch.Tensor
    after: torch.cuda.Event | None = field(default=None, repr=False)

    def release(self, after: torch.cuda.Event | None = None) -> None:
        self.after = after
        self.ring.free.put(self)


class HostRing:
    """`slots` buffers of one shape (made on first use, remade for a new shape)."""

    def __init__(self, slots: int, pin: bool):
        self.slots, self.pin = slots, pin
        self.free: queue.Queue[Slot] = queue.Queue()
        self.shape: tuple | None = None
        self.made = 0

    def new_clip(self) -> None:
        """Forget the slots still out: a clip that failed or was dropped never gives back the ones
        its decoder and the engine held, and the next clip of the same size would wait for them
        forever. They are garbage once their holders let go; the ring makes new ones."""
        self.made = 0
        while not self.free.empty():
            self.free.get_nowait()

    def acquire(self, shape: tuple, stop: threading.Event | None = None) -> Slot | None:
        """A free buffer of `shape` (waiting for one), or None once `stop` is set."""
        if shape != self.shape:  # a new clip size: the old buffers are dropped as they come back
            self.shape, self.made = shape, 0
            # and those back already, now: a clip of fewer batches than slots takes none back from
            # `free` (it makes its own), so each change of size left a ring's worth here (longrun.py)
            while not self.free.empty():  # the acquiring (decoder) thread is the only taker
                self.free.get_nowait()
        while True:
            if self.made < self.slots:
                self.made += 1
                return self._new(shape)
            try:
                slot = self.free.get(timeout=0.1)
            except queue.Empty:
                if stop is not None and stop.is_set():
                    return None
                continue
            if slot.array.shape != shape:
                continue
            if slot.after is not None:
                slot.after.synchronize()  # long done: the upload was issued a batch or more ago
            return slot

    def _new(self, shape: tuple) -> Slot:
        tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin)
        return Slot(self, tensor.numpy(), tensor)
