"""Inputs of the tile passes for the kernel tests: weights of one shape with random permutations cut into blocks as
POET cuts them (full blocks, a ragged one, or one block per side in the fully stochastic mode), and the flat buffer
offsets a step gives their blocks."""
import torch

from geomopt.geometry import block_layout
from geomopt.geometry.tiles import TileLayout, tile_layout

# (weights, rows, cols, b, fully stochastic): b in {16, 32, 64, 128}; ragged sizes 5, 37, 100; odd shapes
CASES = [(2, 64, 48, 16, False), (3, 63, 37, 16, False), (2, 96, 80, 32, False), (2, 128, 70, 64, False),
         (2, 37, 29, 5, False), (1, 80, 63, 37, False), (2, 200, 130, 100, False), (1, 256, 130, 128, False),
         (2, 80, 63, 32, True)]
IDS = [f"{n}x{m}x{c}-b{b}{'-fs' if fs else ''}" for n, m, c, b, fs in CASES]


def layout(count: int, m: int, n: int, b: int, fs: bool, g: torch.Generator) -> tuple[TileLayout, int]:
    """A ``TileLayout`` of ``count`` weights (m, n) and the size of the flat buffer its blocks take."""
    rows = [block_layout(torch.randperm(m, generator=g), b, fs) for _ in range(count)]
    cols = [block_layout(torch.randperm(n, generator=g), b, fs) for _ in range(count)]
    off, ro, co = 0, [], []
    for w in range(count):
        for side, out in ((rows[w], ro), (cols[w], co)):
            at = []
            for idx in side:
                at.append(off)
                off += idx.numel() * idx.shape[1]
            out.append(at)
    return tile_layout(rows, cols, (m, n), ro, co), off


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
