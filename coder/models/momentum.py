"""Momentum (key) encoders and the FIFO memory banks of CODER's M-DCL (paper §3.2; MoCo).

Train/eval mode of a key encoder is left to the caller: `make_key_encoder` copies the query's mode
and nothing here changes it. MoCo runs the key encoder in train mode during training (BatchNorm
uses batch statistics), so keep it in the same mode as the model (`model.train()` does this when the
key encoder is a submodule). Its running BatchNorm statistics are copied from the query encoder by
`momentum_update`, so in eval mode it behaves like a parameter-averaged query encoder.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..distributed import all_gather_equal_rows, all_gather_rows

__all__ = ["momentum_update", "make_key_encoder", "FeatureQueue", "MomentumContrast"]


def _unwrap(module: nn.Module) -> nn.Module:
    """The wrapped module of a DistributedDataParallel/DataParallel wrapper, else the module."""
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return module.module
    return module


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, m: float) -> None:
    """theta_k = m * theta_k + (1 - m) * theta_q for parameters; buffers copied from the query.

    Parameters and buffers are paired in registration order, so `query` may be a DDP wrapper of
    the module `key` was copied from.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1], got {m}")
    key, query = _unwrap(key), _unwrap(query)
    key_params, query_params = _paired(key.named_parameters(), query.named_parameters(), "parameter")
    key_buffers, query_buffers = _paired(key.named_buffers(), query.named_buffers(), "buffer")
    if key_params:
        torch._foreach_lerp_(key_params, query_params, 1.0 - m)  # k + (1-m)(q - k), MoCo's update
    if key_buffers:
        torch._foreach_copy_(key_buffers, query_buffers)  # one op for every buffer, not one per buffer


def _paired(key_named, query_named, kind: str) -> tuple[list[Tensor], list[Tensor]]:
    """Tensors of two modules paired by order, with a clear error when the structures differ."""
    key_named, query_named = list(key_named), list(query_named)
    if len(key_named) != len(query_named):
        raise ValueError(
            f"key encoder has {len(key_named)} {kind}s but query encoder has {len(query_named)}: "
            "the key encoder must be a copy of the query encoder (make_key_encoder)"
        )
    for (k_name, k), (q_name, q) in zip(key_named, query_named):
        if k.shape != q.shape:
            raise ValueError(
                f"{kind} shape mismatch: key {k_name} {tuple(k.shape)} vs query {q_name} {tuple(q.shape)}"
            )
    return [k for _, k in key_named], [q for _, q in query_named]


def make_key_encoder(query: nn.Module) -> nn.Module:
    """A frozen deep copy of `query` (unwrapped from DDP), with the query's train/eval mode."""
    key = copy.deepcopy(_unwrap(query))
    key.requires_grad_(False)
    return key


class FeatureQueue(nn.Module):
    """FIFO of unit vectors with the image id of each entry, as registered buffers (saved in state_dict).

    Buffers: features (size, dim) random unit vectors at first, ids (size,) long with -1 for "no
    image", ptr (1,) the next slot to write, filled (1,) how many slots hold real keys. `ptr` and `filled`
    are mirrored in Python ints (refreshed when a state dict is loaded), so enqueue never reads a device
    scalar back.
    Initialise with the same seed on every DDP rank (or broadcast) so the random start agrees.
    Enqueue only after backward, or read `features.clone()`: enqueue writes the buffer in place.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"FeatureQueue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("features", nn.functional.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("filled", torch.zeros(1, dtype=torch.long))
        self._ptr = self._filled = 0
        self.register_load_state_dict_post_hook(FeatureQueue._mirror_pointers)

    @staticmethod
    def _mirror_pointers(queue: FeatureQueue, incompatible_keys=None) -> None:
        """Python copies of the loaded `ptr` / `filled` buffers (one read-back per load, not per step)."""
        queue._ptr, queue._filled = int(queue.ptr), int(queue.filled)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, ids: Tensor, equal_rows: bool = True) -> None:
        """Write a batch of keys (B, dim) and their image ids (B,) over the oldest entries.

        Under DDP (initialised, world size > 1) keys and ids of all ranks are gathered first, in
        rank order, so every rank holds the same queue. With `equal_rows` (a training batch: the loader
        drops the uneven last one) no row count is exchanged, so the step never waits for the device;
        otherwise the ranks first exchange their counts. Batches that do not divide the size wrap
        around; a batch larger than the queue keeps its newest `size` keys.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"FeatureQueue.enqueue: keys must be (B, {self.dim}), got {tuple(keys.shape)}")
        if ids.shape != (keys.shape[0],):
            raise ValueError(
                f"FeatureQueue.enqueue: ids must be ({keys.shape[0]},) like keys, got {tuple(ids.shape)}"
            )
        keys = keys.detach().to(self.features)
        ids = ids.detach().to(device=self.ids.device, dtype=torch.long)
        # every rank's keys in rank order (a no-op in one process); every rank's batch has B rows (drop_last)
        keys, ids = all_gather_equal_rows(keys, ids) if equal_rows else all_gather_rows(keys, ids)
        batch = keys.shape[0]
        kept = min(batch, self.size)  # older keys of an oversized batch would be overwritten anyway
        start = self._ptr
        slots = (start + torch.arange(batch - kept, batch, device=self.features.device)) % self.size
        self.features[slots] = keys[batch - kept:]
        self.ids[slots] = ids[batch - kept:]
        self._ptr, self._filled = (start + batch) % self.size, min(self._filled + batch, self.size)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)

    def fill_fraction(self) -> float:
        """Fraction of slots that hold real keys rather than the random initialisation."""
        return self._filled / self.size


class MomentumContrast(nn.Module):
    """Momentum key encoders and the coupled memory banks B_v, B_w (§3.2; MoCo): the one home of MoCo here."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, dim: int, queue_size: int, m: float):
        super().__init__()
        self.m = m
        self.key_image_encoder = make_key_encoder(image_encoder)
        self.key_text_encoder = make_key_encoder(text_encoder)
        self.queue_v = FeatureQueue(queue_size, dim)  # B_v: image keys
        self.queue_w = FeatureQueue(queue_size, dim)  # B_w: text keys

    @torch.no_grad()
    def update(self, image_encoder: nn.Module, text_encoder: nn.Module) -> None:
        """theta_k = m theta_k + (1 - m) theta_q for both key encoders (§3.2; MoCo)."""
        momentum_update(self.key_image_encoder, image_encoder, self.m)
        momentum_update(self.key_text_encoder, text_encoder, self.m)

    @torch.no_grad()
    def encode(self, regions, region_lengths, input_ids, text_lengths, clip=None) -> tuple[Tensor, Tensor]:
        """The keys (v_key, w_key) of a batch from the key encoders."""
        return self.key_image_encoder(regions, region_lengths, clip), self.key_text_encoder(input_ids, text_lengths)[0]

    def snapshot(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Copies of the banks for the loss: B_v, B_w and the image id of each entry. A copy (MoCo's
        `queue.clone().detach()`), so the enqueue that follows cannot change what the loss saw."""
        return tuple(t.clone() for t in (self.queue_v.features, self.queue_w.features, self.queue_v.ids,
                                         self.queue_w.ids))

    @torch.no_grad()
    def enqueue(self, v_key: Tensor, w_key: Tensor, image_ids: Tensor) -> None:
        """FIFO update with a step's keys; keys are all-gathered across ranks inside the queue."""
        self.queue_v.enqueue(v_key, image_ids)
        self.queue_w.enqueue(w_key, image_ids)

    @torch.no_grad()
    def encode_pairs(self, regions, region_lengths, input_ids, text_lengths, clip=None) -> Tensor:
        """x = L2norm(v^I + w^I) from the momentum encoders: the k-means input of PGC (§3.4)."""
        v, w = self.encode(regions, region_lengths, input_ids, text_lengths, clip)
        return nn.functional.normalize(v + w, dim=-1)
