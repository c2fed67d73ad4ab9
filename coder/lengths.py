"""The lengths of a padded batch, as collate computes them on the CPU and the models read them on the device.

`Lengths` carries what a forward needs from the lengths (the longest, the distinct lengths, the real
positions), computed before the batch moves, so a training step never waits for the device to read a
length back. The data pipeline builds it; aggregators, heads, the packed BERT and SGE consume it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def valid_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, max_len) bool, True at real (non-padded) positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class Lengths:
    """The lengths (B,) of a padded batch and what the forward derives from them, computed once on the CPU.

    `max_len`, `min_len`, `total` are Python ints; `distinct` (the sorted distinct lengths) stays on the
    CPU for `pack_padded_sequence`; `lengths`, `inverse` (batch row -> index into `distinct`),
    `distinct_on` (`distinct` on the device) and `real` (flat indices of the real positions of a
    (B, width) layout, ascending) move with `.to`. For a packed RNN over the rows (the BiGRU text encoder),
    `descending` (the lengths sorted, longest first) stays on the CPU and `order` (the rows in that order) and
    `restore` (its inverse) move. A plain class, not a dataclass or NamedTuple, so
    DataLoader and DistributedDataParallel pass it through as it is instead of moving `distinct`.
    """

    __slots__ = ("lengths", "width", "max_len", "min_len", "total", "distinct", "distinct_on", "inverse", "real",
                 "descending", "order", "restore")
    MOVED = ("lengths", "distinct_on", "inverse", "real", "order", "restore")

    def __init__(self, lengths: Tensor, width: int | None = None):
        cpu = lengths.detach().to("cpu", torch.long)  # one read-back when `lengths` lives on a device
        self.lengths = lengths.long()
        self.max_len = int(cpu.max()) if len(cpu) else 0
        self.min_len = int(cpu.min()) if len(cpu) else 0
        self.total = int(cpu.sum())
        self.width = self.max_len if width is None else width
        if self.width < self.max_len:
            raise ValueError(f"Lengths: width {self.width} is below the longest length {self.max_len}")
        self.distinct, inverse = torch.unique(cpu, return_inverse=True)
        self.inverse = inverse.to(lengths.device)
        self.distinct_on = self.distinct.to(lengths.device)
        self.real = valid_mask(cpu, self.width).flatten().nonzero().squeeze(1).to(lengths.device)
        self.descending, order = torch.sort(cpu, descending=True, stable=True)
        self.order, self.restore = order.to(lengths.device), torch.argsort(order).to(lengths.device)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def to(self, device, non_blocking: bool = False) -> Lengths:
        """A copy whose tensors (except the CPU `distinct`) are on `device`."""
        return self._with(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self, device=None) -> Lengths:
        """Pinned copies, so that `.to(cuda, non_blocking=True)` overlaps (DataLoader pin_memory calls this)."""
        return self._with(lambda t: t.pin_memory())

    def _with(self, move) -> Lengths:
        out = object.__new__(Lengths)
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(out, name, move(value) if name in self.MOVED else value)
        return out

    def real_at(self, width: int) -> Tensor:
        """`real` for a (B, width) layout (width >= max_len), remapped on the device without a read-back."""
        if width == self.width:
            return self.real
        if width < self.max_len:
            raise ValueError(f"Lengths: width {width} is below the longest length {self.max_len}")
        return self.real // self.width * width + self.real % self.width

    def tolist(self) -> list[int]:
        return self.lengths.tolist()

    def __getitem__(self, index) -> Tensor:  # reads the length tensor, as `lengths[:, None]` of a mask
        return self.lengths[index]

    def __len__(self) -> int:
        return len(self.lengths)

    def __repr__(self) -> str:
        return f"Lengths({self.lengths.tolist()}, width={self.width})"


def as_lengths(lengths: Tensor | Lengths, like: Tensor | None = None, width: int | None = None) -> Lengths:
    """`lengths` as a `Lengths` on the device of `like`: a tensor is converted (one read-back; fine outside
    the training step), a `Lengths` is passed through (moved, should the caller not have moved it)."""
    if not isinstance(lengths, Lengths):
        return Lengths(lengths, width)
    if like is not None and lengths.device != like.device:
        return lengths.to(like.device, non_blocking=True)
    return lengths


def length_tensor(lengths: Tensor | Lengths, like: Tensor) -> Tensor:
    """The (B,) length tensor of either form, for the modules that need no more than a mask."""
    return as_lengths(lengths, like).lengths if isinstance(lengths, Lengths) else lengths
