"""Images are 2-D: the order each block reads its tokens in, and each token's four grid neighbours.

Patches are numbered in raster order: token ``i`` sits at row ``i // G``, column ``i % G``
of the G x G patch grid. A block reads its tokens in one *order*: ``order[j]`` is the raster
index of the j-th token it reads. Its token shift ("the previous token") and its WKV scan
both run along that order, so a column-major block sees a patch's vertical neighbour next
to it, where a raster block sees it G tokens away.

* ``scan_order`` (a spec field) says which order each block uses:

  - ``raster``: every block reads rows left to right (DiR's original layout);
  - ``alternate``: even blocks rows, odd blocks columns (top to bottom, then the next
    column), as DiM and Vision Mamba alternate directions across layers;
  - ``zigzag``: boustrophedon rows on even blocks, boustrophedon columns on odd blocks
    (ZigMa's idea: consecutive tokens are always grid neighbours, also at a row's end).

* ``token_shift`` (a spec field) says what a token mixes with:

  - ``raster``: the previous token of the block's order (and the mean with the next one
    when the scan is bidirectional);
  - ``q_shift``: Vision-RWKV's 2-D shift. The channels are cut in four quarters; quarter 0
    comes from the left neighbour, 1 from the right, 2 from the one above, 3 from the one
    below, zero past the border. It does not depend on the order.

Everything here is numpy, computed once per model; the backends apply it by index
(a gather), so no framework-specific arithmetic decides the layout. Both settings are
parameter-free: the canonical table does not change, and any checkpoint loads with any
setting (the spec saved with it records the one it was trained with).
"""
from __future__ import annotations

import numpy as np

TOKEN_SHIFT_CHOICES = ("raster", "q_shift")
SCAN_ORDER_CHOICES = ("raster", "alternate", "zigzag")
# The orders one block can read in; scan_order picks one per block.
ORDER_NAMES = ("rows", "columns", "snake_rows", "snake_columns")
# q_shift's quarters: (row offset, column offset) of the neighbour each quarter copies.
Q_SHIFT_OFFSETS = ((0, -1), (0, 1), (-1, 0), (1, 0))  # left, right, above, below


def token_order(name: str, grid: int) -> np.ndarray:
    """The raster indices of a G x G grid in the order ``name`` reads them: int64 [G*G]."""
    index = np.arange(grid * grid, dtype=np.int64).reshape(grid, grid)  # index[row, column]
    if name == "rows":
        return index.reshape(-1)
    if name == "columns":
        return index.T.reshape(-1)
    if name == "snake_rows":  # odd rows right to left
        snake = index.copy()
        snake[1::2] = snake[1::2, ::-1]
        return snake.reshape(-1)
    if name == "snake_columns":  # odd columns bottom to top
        snake = index.T.copy()
        snake[1::2] = snake[1::2, ::-1]
        return snake.reshape(-1)
    raise ValueError(f"token order '{name}': allowed {', '.join(ORDER_NAMES)}")


def block_order_name(scan_order: str, block_index: int) -> str:
    """Which order block ``block_index`` reads in, for the spec's ``scan_order``."""
    if scan_order == "raster":
        return "rows"
    if scan_order == "alternate":
        return "rows" if block_index % 2 == 0 else "columns"
    if scan_order == "zigzag":
        return "snake_rows" if block_index % 2 == 0 else "snake_columns"
    raise ValueError(f"scan_order '{scan_order}': allowed {', '.join(SCAN_ORDER_CHOICES)}")


def inverse_order(order: np.ndarray) -> np.ndarray:
    """``inverse[order[j]] == j``: where each raster token sits in the order."""
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size, dtype=order.dtype)
    return inverse


def grid_neighbours(order: np.ndarray, grid: int) -> np.ndarray:
    """For the token at each position j of ``order``, the positions (in the same order) of its
    left, right, upper and lower neighbours: int64 [4, G*G]. A neighbour past the border is
    ``G*G``, the index of a zero token the backends append."""
    tokens = grid * grid
    position = inverse_order(order)  # position[raster index] -> j
    rows, columns = np.divmod(order, grid)  # grid place of the token at each position
    neighbours = np.full((len(Q_SHIFT_OFFSETS), tokens), tokens, dtype=np.int64)
    for quarter, (d_row, d_column) in enumerate(Q_SHIFT_OFFSETS):
        r, c = rows + d_row, columns + d_column
        inside = (r >= 0) & (r < grid) & (c >= 0) & (c < grid)
        neighbours[quarter, inside] = position[r[inside] * grid + c[inside]]
    return neighbours


def q_shift_index(neighbours: np.ndarray) -> np.ndarray:
    """One flat gather index for q_shift: int64 [4*T].

    With the zero-padded tokens viewed as ``[N, (T+1)*4, D/4]`` (token-major, then quarter),
    entry ``4*j + q`` is ``4*neighbours[q, j] + q``: the q-th quarter of the j-th token's
    neighbour. One ``index_select`` then builds the shifted ``[N, T, D]`` in every backend.
    """
    quarters, tokens = neighbours.shape
    return (neighbours.T * quarters + np.arange(quarters, dtype=np.int64)).reshape(-1)


class BlockLayout:
    """What block ``block_index`` of a spec needs: its order (None when it is raster, so no
    gather runs), the inverse, and q_shift's gather index (None unless ``token_shift`` is q_shift)."""

    def __init__(self, spec, block_index: int):
        grid = spec.grid_size
        self.order_name = block_order_name(spec.scan_order, block_index)
        order = token_order(self.order_name, grid)
        self.order = None if self.order_name == "rows" else order
        self.inverse = None if self.order is None else inverse_order(order)
        self.q_shift_index = q_shift_index(grid_neighbours(order, grid)) if spec.token_shift == "q_shift" else None


def q_shift_reference(x: np.ndarray, grid: int) -> np.ndarray:
    """Vision-RWKV's q_shift written token by token, channel quarter by quarter: the plain form
    the gathers are tied to. x [N, T, D] in raster order (D a multiple of 4) -> [N, T, D]."""
    n, tokens, d = x.shape
    quarter = d // 4
    out = np.zeros_like(x)
    for row in range(grid):
        for column in range(grid):
            for q, (d_row, d_column) in enumerate(Q_SHIFT_OFFSETS):
                r, c = row + d_row, column + d_column
                if 0 <= r < grid and 0 <= c < grid:
                    out[:, row * grid + column, q * quarter:(q + 1) * quarter] = \
                        x[:, r * grid + c, q * quarter:(q + 1) * quarter]
    return out
