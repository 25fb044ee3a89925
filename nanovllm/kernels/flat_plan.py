"""The host side of the flat decode kernel (kernels/decode_flat.py): which tiles each program
attends, from the decode rows' context lengths and block tables. numpy on host values, so the
engine plans a step on the CPU (while the GPU runs the step before) and the kernel never waits."""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FlatPlan:
    """Which tiles each program attends: host arrays (numpy) or their device copies (``to``).

    tiles:  [4, num_tiles] int32: each tile's row, first key, the row's context length and the cache
            block the tile lies in (so the kernel's chain of loads is tile -> K, not tile -> block
            table -> K)
    bounds: [programs + 1] int32: program p attends tiles bounds[p] .. bounds[p + 1]
    pieces: [2, batch] int32: for each row, where its first piece lies (program * 2 + slot) and how
            many programs hold its tiles (1: one writes it whole; 0: the row has no keys)
    """

    block_size: int  # the cache's, whose block ids ``tiles`` holds
    block_n: int  # keys a tile
    tiles: np.ndarray | torch.Tensor
    bounds: np.ndarray | torch.Tensor
    pieces: np.ndarray | torch.Tensor

    @property
    def programs(self) -> int:
        return len(self.bounds) - 1

    def to(self, device: torch.device | str) -> "FlatPlan":
        move = lambda a: torch.as_tensor(a, dtype=torch.int32).to(device)  # noqa: E731
        return FlatPlan(self.block_size, self.block_n, move(self.tiles), move(self.bounds), move(self.pieces))

    def first_rows(self, n: int) -> "FlatPlan":
        """The same plan over a batch's first ``n`` rows (a CUDA graph's buffers, sized for the largest)."""
        return FlatPlan(self.block_size, self.block_n, self.tiles, self.bounds, self.pieces[:, :n])

    def packed(self) -> np.ndarray:
        """tiles, bounds and pieces back to back, int32: one buffer for one host-to-device copy."""
        return np.concatenate([self.tiles.reshape(-1), self.bounds, self.pieces.reshape(-1)]).astype(np.int32)

    def views_of(self, buffer: torch.Tensor) -> "FlatPlan":
        """This plan read from ``buffer``, where ``packed()`` was copied: views, no copies."""
        n_tiles, n_bounds = self.tiles.size, self.bounds.size
        tiles = buffer[:n_tiles].view(4, -1)
        bounds = buffer[n_tiles : n_tiles + n_bounds]
        pieces = buffer[n_tiles + n_bounds : n_tiles + n_bounds + self.pieces.size].view(2, -1)
        return FlatPlan(self.block_size, self.block_n, tiles, bounds, pieces)


def plan_flat_decode(
    context_lens, block_tables, block_size: int, block_n: int, programs: int, min_tiles: int = 1
) -> FlatPlan:
    """Cut the rows' tiles (``ceil(len / block_n)`` each, in row order) into at most ``programs``
    ranges of equal length (to one tile), none shorter than ``min_tiles`` unless there are fewer
    tiles than that; the programs past the last range get an empty one. ``block_tables``: [batch,
    max_blocks], host values (the table's padding is not read). With fewer tiles than programs (a
    small batch) every tile is a program of its own, as the split kernel spreads one row over the
    GPU."""
    assert programs >= 1 and min_tiles >= 1
    assert block_n >= 1 and block_size % block_n == 0, (
        f"tiles of {block_n} keys must lie inside blocks of {block_size}"
    )
    lens = np.asarray(context_lens, dtype=np.int64).reshape(-1)
    assert (lens >= 0).all(), "context lengths must be >= 0"
    table = np.asarray(block_tables)
    per_row = -(-lens // block_n)
    num_tiles = int(per_row.sum())
    first = np.cumsum(per_row) - per_row  # each row's first tile
    row = np.repeat(np.arange(len(lens)), per_row)
    key = (np.arange(num_tiles) - first[row]) * block_n
    tiles = np.stack([row, key, lens[row], table[row, key // block_size]]).astype(np.int32)

    used = max(1, min(programs, num_tiles // min_tiles)) if num_tiles else 0
    bounds = np.full(programs + 1, num_tiles, dtype=np.int64)
    bounds[: used + 1] = np.arange(used + 1) * num_tiles // max(used, 1)
    p_first = np.searchsorted(bounds, first, side="right") - 1
    p_last = np.searchsorted(bounds, first + per_row - 1, side="right") - 1
    slot = first != bounds[np.clip(p_first, 0, programs)]  # the row starts inside p_first's range
    count = np.where(per_row > 0, p_last - p_first + 1, 0)
    pieces = np.stack([np.where(per_row > 0, 2 * p_first + slot, 0), count]).astype(np.int32)
    return FlatPlan(block_size, block_n, tiles, bounds.astype(np.int32), pieces)


def device_programs(device: torch.device, num_kv_heads: int, per_sm: int = 2) -> int:
    """Programs per KV head for ``per_sm`` programs on every SM (2: what fits of the fp8 loop,
    kernels/decode_flat.py)."""
    if device.type != "cuda":
        return 8
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, per_sm * sms // num_kv_heads)
