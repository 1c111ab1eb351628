"""What keeps a step whole: the commit section that a Ctrl-C cannot cut, the retry record, and the plain mode
(no autocast, no inference mode) the step runs in.

A geomopt step computes every new value first and then commits each weight (its new value and its new state)
in one short section of in-place copies and dict updates, which allocate nothing, so running out of memory
cannot stop it half-way; a SIGINT that arrives inside that section is held and delivered when it ends. When
``step()`` raises anyway, the weights it committed are remembered with their gradients (``Retry``): calling
``step()`` again with the same gradients completes the interrupted step instead of repeating it.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import weakref
from typing import Any, Iterable, Iterator

import torch

__all__ = ["deferred_interrupt", "HeldInterrupt", "plain_mode", "Retry"]


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a SIGINT (Ctrl-C) that arrives inside the block and deliver it at its end (main thread only; other
    threads never receive signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    try:
        old = signal.signal(signal.SIGINT, lambda sig, frame: pending.append(frame))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if pending:
            if callable(old):
                old(signal.SIGINT, pending[0])
            elif old == signal.SIG_DFL:
                raise KeyboardInterrupt


class HeldInterrupt:
    """``deferred_interrupt`` for a whole step, with the handler installed once: inside ``with guard:`` a SIGINT
    raises KeyboardInterrupt at once as usual, unless it arrives inside ``with guard.held:`` (a commit), where it
    is raised when that section ends. (Two ``signal.signal`` calls a step instead of two per weight.)"""

    def __init__(self) -> None:
        self._old: Any = None
        self._installed = False
        self._depth = 0
        self._pending = False
        self.held = _Held(self)

    def __enter__(self) -> "HeldInterrupt":
        self._pending = False
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except ValueError:  # not the main interpreter
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._old)
            self._installed = False
        if self._pending:
            self._pending = False
            self._deliver()

    def _handler(self, sig: int, frame: Any) -> None:
        if self._depth:
            self._pending = True
        else:
            self._deliver(frame)

    def _deliver(self, frame: Any = None) -> None:
        if callable(self._old):
            self._old(signal.SIGINT, frame)
        elif self._old in (signal.SIG_DFL, None):
            raise KeyboardInterrupt


class _Held:
    def __init__(self, guard: HeldInterrupt):
        self.guard = guard

    def __enter__(self) -> None:
        self.guard._depth += 1

    def __exit__(self, *exc: Any) -> None:
        g = self.guard
        g._depth -= 1
        if not g._depth and g._pending:
            g._pending = False
            g._deliver()


@contextlib.contextmanager
def plain_mode(device_types: Iterable[str]) -> Iterator[None]:
    """Outside ``torch.inference_mode`` (the step makes state that later steps update in place, and POET
    differentiates its Cayley maps) and with autocast off on the parameters' devices (the factors' products stay
    in their own precision)."""
    with contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))  # which turns grad mode on again:
            stack.enter_context(torch.no_grad())
        for kind in sorted(set(device_types)):
            if torch.is_autocast_enabled(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield


class Retry:
    """The parameters an interrupted step committed, each with the gradient it was stepped with."""

    def __init__(self) -> None:
        self._done: dict[int, tuple[Any, Any, int]] = {}

    def remember(self, params: Iterable[torch.Tensor]) -> None:
        self._done = {id(p): (weakref.ref(p), weakref.ref(p.grad), p.grad._version)
                      for p in params if p.grad is not None}

    def forget(self) -> None:
        self._done = {}

    def done(self, p: torch.Tensor) -> bool:
        """Whether ``p`` was stepped by the interrupted step with the gradient it holds now."""
        rec = self._done.get(id(p))
        return rec is not None and rec[0]() is p and p.grad is not None and rec[1]() is p.grad \
            and rec[2] == p.grad._version
