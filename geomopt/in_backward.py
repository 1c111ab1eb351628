"""Step each weight during the backward pass, as soon as its gradient is ready, and free that gradient.

``geomopt.step_in_backward(model, optimizer)`` registers a post-accumulate-grad hook on every parameter
the optimizer holds: when a parameter's gradient is complete, the optimizer steps that parameter alone
and sets its ``.grad`` to None, so the dense gradients of the whole model never exist at once. The
result equals the ordinary ``loss.backward(); optimizer.step()`` loop (each parameter's update reads
only its own gradient and state), with any torch or geomopt optimizer.

Under ``DistributedDataParallel`` the per-parameter hooks would see the local, un-averaged gradient, so a
DDP communication hook is registered instead: each bucket is all-reduced (mean over ranks) and its
parameters are stepped with the averaged gradients as soon as the bucket is reduced.

Gradient accumulation: run the backward of every micro-batch but the last inside
``handle.no_step()``: gradients accumulate there as usual (under DDP it also enters ``no_sync()``),
and the last micro-batch's backward steps. What this mode cannot do: anything that needs all gradients
at once before the step (global-norm clipping, ``nonfinite="raise"`` over the whole model: it then
applies per parameter), and steps of an optimizer whose update of one parameter reads another's gradient.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["StepInBackward", "step_in_backward"]


class StepInBackward:
    """The handle ``step_in_backward`` returns: ``no_step()`` for accumulation, ``remove()`` to undo."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if getattr(model, "_geomopt_step_in_backward", None) is not None:
            raise RuntimeError("step_in_backward is already active on this model: call remove() on its handle "
                               "first")
        self.model, self.optimizer = model, optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        owned = {id(p) for p in self.params}
        module_params = {id(p) for p in model.parameters()}
        missing = [tuple(p.shape) for p in self.params if id(p) not in module_params]
        if missing:
            raise ValueError(f"optimizer holds {len(missing)} tensor(s) that are not parameters of model "
                             f"(first of shape {missing[0]}): build the optimizer on this model")
        self._owned = owned
        self._paused = False
        self._handles: list = []
        self._ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if self._ddp:
            self._register_ddp()
        else:
            for p in self.params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        model._geomopt_step_in_backward = self

    # ------------------------------------------------------------------ stepping
    def _step(self, params: list[torch.Tensor]) -> None:
        """One optimizer step on ``params`` alone: every other parameter's gradient is set aside for it."""
        chosen = {id(p) for p in params}
        aside = [(q, q.grad) for q in self.params if id(q) not in chosen and q.grad is not None]
        for q, _ in aside:
            q.grad = None
        try:
            self.optimizer.step()
        finally:
            for q, g in aside:
                q.grad = g
        for p in params:
            p.grad = None

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._paused:
            self._step([p])

    def _register_ddp(self) -> None:
        import torch.distributed as dist
        from torch.autograd import Variable

        ddp = self.model
        group = ddp.process_group
        pending = {"queued": False}

        def clear() -> None:  # end of backward: no averaged gradient is left behind in .grad
            for p in self.params:
                p.grad = None
            pending["queued"] = False

        def hook(_state, bucket):
            buf = bucket.buffer()
            buf.div_(dist.get_world_size(group))
            dist.all_reduce(buf, group=group)  # synchronous: the step below runs on this thread, in order
            for p, g in zip(bucket.parameters(), bucket.gradients()):
                if id(p) in self._owned:
                    p.grad = g
                    self._step([p])
            if not pending["queued"]:
                Variable._execution_engine.queue_callback(clear)
                pending["queued"] = True
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(buf)
            return fut

        ddp.register_comm_hook(None, hook)
        reducer = getattr(ddp, "reducer", None)
        if reducer is not None and hasattr(reducer, "_set_optimizer_in_backward"):
            reducer._set_optimizer_in_backward()  # the reducer then leaves .grad alone after the hook

    # ------------------------------------------------------------------ user API
    @contextlib.contextmanager
    def no_step(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients without stepping (under DDP: without all-reduce)."""
        if self._paused:
            raise RuntimeError("no_step() is already active")
        self._paused = True
        try:
            if self._ddp:
                with self.model.no_sync():
                    yield
            else:
                yield
        finally:
            self._paused = False

    def remove(self) -> None:
        """Remove the hooks; the optimizer then steps only when ``step()`` is called. Under DDP the
        communication hook cannot be unregistered: wrap the module in a new DistributedDataParallel."""
        if self._ddp:
            raise RuntimeError("a DDP communication hook cannot be removed: wrap the module in a new "
                               "DistributedDataParallel instead")
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model._geomopt_step_in_backward = None


def step_in_backward(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> StepInBackward:
    """Step every parameter of ``optimizer`` inside ``loss.backward()``, as soon as its gradient is
    complete, and free that gradient (see the module docstring). ``model`` is the module the loss comes
    from (a ``DistributedDataParallel`` wrapper included). Returns a handle with ``no_step()`` (gradient
    accumulation: all micro-batches but the last) and ``remove()``. After it, ``optimizer.step()`` and
    ``zero_grad()`` are no-ops you may keep in the loop; learning-rate schedulers work as before::

        handle = geomopt.step_in_backward(model, opt)
        for batch in data:
            loss_fn(model, batch).backward()   # steps and frees each weight's gradient here
            scheduler.step()
    """
    return StepInBackward(model, optimizer)
