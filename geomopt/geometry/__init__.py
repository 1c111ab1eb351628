"""Pure-torch geometry: skew packing, Cayley maps, block rotations, tall QR. These are the references."""
from .blocks import block_layout, block_sizes, col_block_grad, rotate_cols, rotate_rows, row_block_grad
from .cayley import cayley_exact, cayley_neumann, cayley_series, rotation_inverse
from .qr import tall_qr
from .skew import pack_skew, skew_norm_bound, skew_size, unpack_skew

__all__ = [
    "block_layout", "block_sizes", "col_block_grad", "rotate_cols", "rotate_rows", "row_block_grad",
    "cayley_exact", "cayley_neumann", "cayley_series", "rotation_inverse", "pack_skew", "skew_norm_bound",
    "skew_size", "unpack_skew", "tall_qr",
]
