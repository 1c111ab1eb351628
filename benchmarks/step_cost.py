"""What one optimizer step costs, in the three numbers that predict it on a GPU, measured on any machine.

    python benchmarks/step_cost.py --preset 60m                     # every optimizer, a plain and a merge step
    python benchmarks/step_cost.py --preset small --optimizers adamw-fused,poet --out bench-out/step-cost

The metric (``StepCost``, a ``TorchDispatchMode`` around ``optimizer.step()``):

- ops: every aten op dispatched during the step (on a GPU each is a kernel launch, or host work between them);
- bytes: for every op that is not a view, the bytes of the distinct tensors it reads or writes, each tensor
  counted once per op (an in-place operand, read and written, counts once; two views of one tensor are two
  tensors when their offsets, shapes or strides differ), as ``numel * element_size`` of the view, a broadcast
  (stride 0) dimension counted once: on a GPU, the memory traffic if nothing stayed in cache. Allocations that
  write nothing (``empty``, ``empty_like``, ``new_empty``, ``empty_strided``) move no bytes, nor do the aliasing
  ops that aten does not mark as views (``_unsafe_view``, which ``matmul`` uses to reshape its result,
  ``alias``, ``lift_fresh``). Printed as a multiple of the parameters' bytes and as a ratio to torch's fused
  AdamW;
- host syncs: ops that wait for a value on the host (``_local_scalar_dense``: ``.item()``, ``float()``,
  ``bool()``; ``nonzero``, ``equal``, ``is_nonzero``) and ``Tensor.tolist()`` calls (a device-to-host copy on a
  GPU);
- kernel launches (``geomopt.kernels``, counted through ``geometry.dispatch.record_launches``): each is one op, and
  its bytes are those of its launch arguments, every tensor it reads or writes counted once (those reached
  through its tables of pointers included), as for an aten op; a table of host numbers copied to the device counts
  as a launch too; the torch calls Triton's interpreter makes to run a kernel are not counted. ``--kernels`` runs
  the step on the kernel path (on a CPU under the interpreter: set ``TRITON_INTERPRET=1``; its wall time means
  nothing there);
- launches: the ops that move bytes (on a GPU each is a kernel or a copy; views, allocations and reads of host
  numbers are not), kernel launches included; per weight shape, the launches over the number of routed shapes;
- wall: the step's time on this machine, outside the meter: the same kind of step one cycle later;
- bytes by op: the bytes split by the aten op that moved them (the eight largest per step in the JSON, the four
  largest of the plain step in the Markdown), to show which passes over the weights a step makes.

Each optimizer is built on the preset's model (``geomopt-bench``'s presets and constructors), takes two warm-up
steps (its state exists), then one plain step and one step that merges (POET) or resets (ReLoRA) are metered,
and the same two steps of the next cycle timed;
``--cycle`` sets the merge / reset interval so that the second measured step is a cycle's last. The gradients
come from real batches of the embedded corpus. The rows go to ``--out`` as ``step_cost.json`` and ``step_cost.md``
(``geomopt.report``).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections import Counter
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from geomopt import bench, registry, report
from geomopt.data import load_corpus, sample_batch
from geomopt.geometry import dispatch
from geomopt.optim import FactorOptimizer
from geomopt.optim.routing import is_factorized
from geomopt.timing import Clock

_A = torch.ops.aten
SYNC_OPS = {_A._local_scalar_dense.default, _A.nonzero.default, _A.equal.default, _A.is_nonzero.default,
            _A.item.default}
ALLOCATIONS = {_A.empty, _A.empty_like, _A.new_empty, _A.empty_strided}  # write nothing: no traffic
ALIASES = {_A._unsafe_view, _A.alias, _A.lift_fresh}  # views that are not marked as views: no traffic

DEFAULT = ("adamw-fused,adamw-foreach,adamw-loop,poet,poet+fused,poet-lean,poet-lean+fused,poet-lean+fused+capturable,"
           "relora,relora+fused,dlra")


class StepCost(TorchDispatchMode):
    """Counts ops, bytes and host syncs of everything dispatched inside it (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.syncs = 0
        self.by_op: Counter = Counter()
        self.bytes_by_op: Counter = Counter()
        self.launches: list[dispatch.Launch] = []
        self.moving = 0

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        meter = self

        def tolist(t, *a, **k):
            meter.syncs += 1
            meter.by_op["Tensor.tolist"] += 1
            return meter._tolist(t, *a, **k)

        torch.Tensor.tolist = tolist
        self._recording = dispatch.record_launches()
        self.launches = self._recording.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        self._recording.__exit__(*exc)
        for launch in self.launches:  # a kernel launch: one op, the bytes of its arguments
            self.ops += 1
            self.moving += 1
            self.bytes += launch.bytes
            self.by_op[launch.name] += 1
            self.bytes_by_op[launch.name] += launch.bytes
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        self.by_op[str(func.overloadpacket.__name__)] += 1
        if func in SYNC_OPS:
            self.syncs += 1
        if not func.is_view and func.overloadpacket not in ALLOCATIONS | ALIASES:
            seen: dict[tuple, int] = {}
            for t in tree_flatten((args, kwargs, out))[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                           t.dtype)
                    seen[key] = math.prod(n for n, st in zip(t.shape, t.stride()) if st) * t.element_size()
            moved = sum(seen.values())
            self.bytes += moved
            if moved:
                self.moving += 1
                self.bytes_by_op[str(func.overloadpacket.__name__)] += moved
        return out


def _make(name: str, args: argparse.Namespace) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    """The constructor of ``name``; ``NAME+foreach`` / ``NAME+fused`` set that flag in every group (geomopt: the
    multi-tensor path, weights of one shape stepped together, which is the default on a GPU; ``+fused`` keeps the
    fused Adam kernel for the factors, as that default does); ``+capturable`` (POET lean mode) the step whose
    decisions stay on the device; suffixes combine (``poet-lean+fused+capturable``)."""
    base, *flags = name.split("+")
    for flag in flags:
        if flag not in ("foreach", "fused", "capturable"):
            raise SystemExit(f"--optimizers: unknown suffix {flag!r} in {name!r} (+foreach, +fused or +capturable)")
    if base not in registry.REGISTRY:
        raise SystemExit(f"--optimizers: unknown optimizer {base!r} (choose from {registry.names()})")
    spec = registry.get(base)

    def build(m: torch.nn.Module) -> torch.optim.Optimizer:
        opt = spec.build_for_bench(m, spec.bench_lr, args)
        for group in opt.param_groups:
            for flag in flags:
                group[flag] = True
        return opt

    return build


def _grads(model: torch.nn.Module, train: torch.Tensor, args: argparse.Namespace, gen: torch.Generator) -> None:
    model.zero_grad(set_to_none=True)
    bench.next_token_loss(model, sample_batch(train, args.batch, args.seq_len, gen).to(args.device)).backward()


def _kernel_path(args: argparse.Namespace) -> Any:
    """The context the steps run in: with ``--kernels``, the kernel path (on a CPU under Triton's interpreter)."""
    if not args.kernels:
        return contextlib.nullcontext()
    if args.device.startswith("cpu"):
        return dispatch.kernels_on_cpu()
    os.environ["GEOMOPT_KERNELS"] = "1"
    return contextlib.nullcontext()


def measure(name: str, args: argparse.Namespace, train: torch.Tensor, cycle: int) -> dict[str, Any]:
    """The plain step and the cycle's last step of one optimizer: {kind: {ops, bytes, syncs, launches, wall_ms}}.
    Two cycles: the first one's are metered, the second one's timed (the optimizer warm both times: its state and
    caches exist); under Triton's interpreter the second cycle is skipped (its times mean nothing)."""
    model = bench.build_model(args).to(args.device, getattr(torch, args.dtype))
    opt = _make(name, args)(model)
    gen = torch.Generator().manual_seed(args.seed)
    shapes = {tuple(p.shape) for g in opt.param_groups for p in g["params"]
              if isinstance(opt, FactorOptimizer) and is_factorized(p, g)}  # the routed weights' shapes
    out: dict[str, Any] = {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                           "shapes": len(shapes)}
    steps = cycle if args.kernels and args.device.startswith("cpu") else 2 * cycle
    with _kernel_path(args):
        for step in range(1, steps + 1):  # the last step of a cycle merges / resets
            _grads(model, train, args, gen)
            at = (step - 1) % cycle + 1
            kind = "plain" if at == cycle - 1 else "merge" if at == cycle else None
            if kind is None:
                opt.step()
            elif step <= cycle:
                meter = StepCost()
                with meter:
                    opt.step()
                out[kind] = dict(ops=meter.ops, bytes=meter.bytes, syncs=meter.syncs, wall_ms=None,
                                 launches=meter.moving, kernels=len(meter.launches),
                                 top_ops=meter.by_op.most_common(8), top_bytes=meter.bytes_by_op.most_common(8))
            else:
                clock = Clock(args.device).start()
                opt.step()
                out[kind]["wall_ms"] = 1000 * clock.lap()
    return out


def rows_of(results: dict[str, dict[str, Any]], baseline: str = "adamw-fused") -> list[dict[str, Any]]:
    """One row per optimizer and step kind, with the ratios the table shows."""
    base = results.get(baseline)
    out = []
    for name, res in results.items():
        for kind in ("plain", "merge"):
            r = res[kind]
            out.append(dict(optimizer=name, step=kind, **{k: v for k, v in r.items()}, shapes=res["shapes"],
                            bytes_per_param=r["bytes"] / res["param_bytes"],
                            vs_baseline=report.ratio(r["bytes"], base[kind]["bytes"] if base else None)))
    return out


def _launches(r: dict[str, Any]) -> str:
    return f"{r['launches']} ({r['launches'] / r['shapes']:.1f})" if r["shapes"] else str(r["launches"])


COLUMNS = [report.Column("optimizer", "optimizer"), report.Column("step", "step"), report.Column("ops", "ops"),
           report.Column("launches (per weight shape)", _launches), report.Column("of which kernels", "kernels"),
           report.Column("bytes / parameter bytes", "bytes_per_param", ".2f"),
           report.Column("bytes vs fused AdamW", "vs_baseline"), report.Column("host syncs", "syncs"),
           report.Column("wall ms", "wall_ms", ".1f")]


def bytes_table(results: dict[str, dict[str, Any]], kind: str = "plain", top: int = 4) -> str:
    """Where each optimizer's bytes go on a ``kind`` step: its ``top`` aten ops by bytes moved, each as a multiple
    of the parameters' bytes."""
    rows = [dict(optimizer=name, split=", ".join(f"{op} {moved / res['param_bytes']:.1f}"
                                                 for op, moved in res[kind]["top_bytes"][:top]))
            for name, res in results.items()]
    return report.markdown(rows, [report.Column("optimizer", "optimizer"),
                                  report.Column("bytes / parameter bytes, by aten op (largest first)", "split")])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(bench.PRESETS))
    p.add_argument("--optimizers", default=DEFAULT, help="comma-separated (default: %(default)s)")
    p.add_argument("--cycle", type=int, default=4, help="merge / reset interval of POET and ReLoRA (>= 3)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch (gradients only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="folder for step_cost.json and step_cost.md")
    p.add_argument("--kernels", action="store_true", help="step on the kernel path (on a CPU: TRITON_INTERPRET=1)")
    p.add_argument("--retraction", default="svd", choices=("svd", "qr"), help="DLRAMomentum's retraction")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the model's dtype (bf16 / fp16: POET lean mode keeps its rounding buffer)")
    a = p.parse_args(argv)
    if a.kernels and a.device.startswith("cpu") and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--kernels on a CPU runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
    if a.cycle < 3:
        raise SystemExit(f"--cycle must be >= 3 (two warm-up steps, then a plain step), got {a.cycle}")
    extra = ["--layers", str(a.layers)] if a.layers else []
    extra += ["--batch", str(a.batch)] if a.batch else []
    args = bench.parse_args(["--preset", a.preset, "--block-size", str(a.block_size), "--rank", str(a.rank),
                             "--merge-every", str(a.cycle), "--reset-every", str(a.cycle), "--device", a.device,
                             "--retraction", a.retraction, *extra])
    args.kernels, args.dtype = a.kernels, a.dtype
    train, _ = load_corpus(2_000_000)
    results = {name: measure(name, args, train, a.cycle) for name in a.optimizers.split(",")}
    info = dict(preset=a.preset, layers=args.layers, cycle=a.cycle, block_size=a.block_size, rank=a.rank,
                device=a.device, kernels=a.kernels, retraction=a.retraction, dtype=a.dtype)
    notes = f"Where the bytes of a plain step go:\n\n{bytes_table(results)}"
    text = report.write(a.out, "step_cost", rows_of(results), COLUMNS, info, notes, a.device)
    print(f"step cost, preset {a.preset} ({args.layers} layers), {a.dtype}, {a.device}, torch {torch.__version__}"
          f"\n\n{text}\n\n{notes}")
    return dict(info=info, results=results)


if __name__ == "__main__":
    main()
