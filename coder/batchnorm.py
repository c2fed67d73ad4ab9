"""BatchNorm over the global batch of every DDP rank without a host sync, for the image heads.

PyTorch's SyncBatchNorm (torch/nn/modules/_functions.py) drops the ranks that hold no rows with a boolean mask
over the gathered counts, three times per forward: each one a wait for the device on CUDA, about 18 per
full-CODER step. Here the per-channel sum, sum of squares and row count of every rank are summed by one
all-reduce (differentiable: the backward all-reduces the gradient of the sums, as PyTorch's SyncBatchNorm
all-reduces its gradient terms), and the mean, the biased variance and the running statistics follow on the
device. In one process, or in eval mode, it is BatchNorm1d.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import distributed as dist


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of every rank's rows together (N x B like 1 x N*B)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_distributed()):
            return super().forward(x)
        channels, dims = x.size(1), [0, *range(2, x.dim())]
        xf = x.float()
        rows = x.numel() // channels  # a Python int: the count is filled in on the device, not copied
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), xf.square().sum(dims), xf.new_full((1,), rows)]))
        count = stats[2 * channels]
        mean = stats[:channels] / count
        var = (stats[channels:2 * channels] / count - mean.square()).clamp_min(0)  # biased, as BatchNorm's
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def global_batchnorm_within(module: nn.Module, owners: tuple[type, ...]) -> nn.Module:
    """`module` with every BatchNorm1d inside a submodule of a type in `owners` replaced (in place) by a
    GlobalBatchNorm holding the same parameters and statistics; the other BatchNorms are left as they are."""
    def convert(parent: nn.Module, inside: bool) -> None:
        for name, child in parent.named_children():
            if inside and type(child) is nn.BatchNorm1d:
                new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
                new.load_state_dict(child.state_dict())
                new.to(next(iter([*child.parameters(), *child.buffers()])).device)
                new.train(child.training)
                setattr(parent, name, new)
            else:
                convert(child, inside or isinstance(child, owners))
    convert(module, isinstance(module, owners))
    return module
