"""Host syncs as a CUDA run would make them, counted on the CPU.

On the CPU a copy to the CPU is a no-op and a scalar read waits for nothing, so a dispatch counter run on CPU
tensors cannot see most of the places where a CUDA step waits for the device. `DeviceDouble` is a tensor that
holds real CPU data but reports device `meta` (the one device type besides the CPU that autograd runs on
without a device runtime: `FakeTensorMode` tensors on `cuda` abort the process at the first backward on a
CPU-only PyTorch, and fake tensors carry no values for the data-dependent ops a step reads). Under
`SyncCounter`, every operation on such tensors runs on their CPU data, with the device rules a CUDA run has:

- a device -> host copy (`.cpu()`, `.tolist()`, `.numpy()` after a copy) is a sync;
- a host -> device copy made without `non_blocking=True` is a sync (a CUDA `copy_` from pageable memory
  waits; the trainer moves batches non-blocking from pinned memory, which does not);
- a scalar read (`.item()`, `float()`, `int()`, `bool()` of a device tensor) is a sync;
- an op whose output size depends on device values (`nonzero`, `masked_select`, boolean-mask indexing,
  `unique`, ...) is a sync;
- a CPU tensor (not a 0-dim scalar) used by a device op is an implicit host -> device copy, a sync, except
  where the op takes its argument on the CPU (`pack_padded_sequence`'s lengths, a packed GRU's batch sizes);
- every other op on device tensors, views excepted, is one kernel (`ops`).

    with SyncCounter() as counter:
        step(to_device_double(batch))
    counter.syncs, counter.where, counter.ops
"""
from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")
aten = torch.ops.aten

DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.equal.default, aten.is_nonzero.default,
                  aten._unique.default, aten._unique2.default, aten.unique_dim.default,
                  aten.unique_consecutive.default, aten.unique_dim_consecutive.default, aten.nonzero_static.default,
                  aten.repeat_interleave.Tensor, aten.bincount.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# ops that take some arguments on the CPU by design (their device code reads them on the host)
CPU_ARGUMENTS = {aten._pack_padded_sequence.default, aten._pad_packed_sequence.default, aten.gru.data,
                 aten.lstm.data, aten.rnn_tanh.data, aten.rnn_relu.data, aten._pack_padded_sequence_backward.default}
# outputs that such ops return on the CPU: (op, output index)
CPU_OUTPUTS = {(aten._pack_padded_sequence.default, 1), (aten._pad_packed_sequence.default, 1)}
RNN_CALLS = {"gru", "lstm", "rnn_tanh", "rnn_relu"}
NO_KERNEL = {aten.detach.default, aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
             aten.lift_fresh.default, aten.alias.default}


class DeviceDouble(torch.Tensor):
    """A CPU tensor (`elem`) that reports device `meta`: a stand-in for a CUDA tensor whose values are real."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=DEVICE, requires_grad=requires_grad)
        out.elem = elem
        return out

    def __repr__(self) -> str:
        return f"DeviceDouble({self.elem!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {}, None)


def _is_double(x) -> bool:
    return isinstance(x, DeviceDouble)


def _on_device(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


def _is_view(func) -> bool:
    return getattr(func, "is_view", False) or func in NO_KERNEL


def _flat(args, kwargs) -> list:
    """The tensors and values of an op's arguments, one list level deep (an aten op nests no further)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def _unwrap_args(args, kwargs):
    def one(a):
        if isinstance(a, (list, tuple)):
            return type(a)(x.elem if type(x) is DeviceDouble else x for x in a)
        return a.elem if type(a) is DeviceDouble else a
    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def _run(func, args, kwargs, counter: SyncCounter | None):
    flat = _flat(args, kwargs)
    on_device = any(_is_double(a) for a in flat) or _on_device(kwargs.get("device"))
    note = counter.note if counter is not None else (lambda kind: None)

    if func in (aten._to_copy.default, aten.copy_.default):
        if counter is not None and on_device:  # a copy on, to or from the device is one kernel (or memcpy)
            counter.ops += 1
            counter.kernels[func.__name__] += 1
        return _copy(func, args, kwargs, note)
    if not on_device:
        return func(*args, **kwargs)
    if func is aten._local_scalar_dense.default:
        note("scalar read")
    elif func in DATA_DEPENDENT:
        note(f"data-dependent {func.__name__}")
    elif func in INDEXING and any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8)
                                  for i in args[1] if i is not None):
        note(f"boolean-mask {func.__name__}")
    if func not in CPU_ARGUMENTS:
        for a in flat:
            if torch.is_tensor(a) and not _is_double(a) and a.dim() > 0:
                note(f"CPU tensor into {func.__name__}")
    if counter is not None and not _is_view(func) and not counter.inside_rnn():
        counter.ops += 1
        counter.kernels[func.__name__] += 1
    unwrapped = {id(a): a for a in flat if _is_double(a)}
    args, kwargs = _unwrap_args(args, kwargs)
    if _on_device(kwargs.get("device")):
        kwargs["device"] = torch.device("cpu")
    out = func(*args, **kwargs)
    by_elem = {id(d.elem): d for d in unwrapped.values()}

    def wrap(t, index=None):
        if not torch.is_tensor(t):
            return t
        if id(t) in by_elem:  # an in-place op returns its input
            return by_elem[id(t)]
        if (func, index) in CPU_OUTPUTS:
            return t
        return DeviceDouble(t)
    if isinstance(out, (tuple, list)):
        return type(out)(wrap(t, i) for i, t in enumerate(out))
    return wrap(out)


def _unwrap(x):
    return x.elem if _is_double(x) else x


def _copy(func, args, kwargs, note):
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if _is_double(src) and not _is_double(dst):
            note("device-to-host copy")
        elif _is_double(dst) and not _is_double(src) and src.dim() > 0 and not non_blocking:
            note("blocking host-to-device copy")
        _unwrap(dst).copy_(_unwrap(src))
        return dst
    x = args[0]
    target = kwargs.get("device")
    to_device = _on_device(target) or (target is None and _is_double(x))
    if _is_double(x) and not to_device:
        note("device-to-host copy")
    elif not _is_double(x) and to_device and not kwargs.get("non_blocking", False):
        note("blocking host-to-device copy")
    kwargs = {**kwargs, "device": torch.device("cpu")} if target is not None else kwargs
    kwargs.pop("non_blocking", None)
    out = func(_unwrap(x), **kwargs)
    return DeviceDouble(out) if to_device else out


class SyncCounter(TorchDispatchMode):
    """Counts, while active, what would make a CUDA host wait (`syncs`, by kind and source line in `where`) and
    the kernels launched (`ops`) by the operations on `DeviceDouble` tensors."""

    def __init__(self):
        super().__init__()
        self.syncs, self.ops, self.where, self.kernels = 0, 0, Counter(), Counter()
        self.rnn_depth, self.rnn_calls, self.rnn_backwards = 0, [], set()

    def inside_rnn(self) -> bool:
        """Whether the current op is part of an RNN call's forward or backward: the CPU runs a GRU as a chain
        of per-step ops, CUDA as one cuDNN call each way (counted once by `_FunctionLevel`)."""
        if self.rnn_depth:
            return True
        node = torch._C._current_autograd_node()
        if node is None or not self.rnn_calls:
            return False
        seq = node._sequence_nr()
        for call in self.rnn_calls:
            if call[0] <= seq < call[1]:
                if call not in self.rnn_backwards:
                    self.rnn_backwards.add(call)
                    self.ops += 1
                    self.kernels["rnn backward (one cuDNN call)"] += 1
                return True
        return False

    def note(self, kind: str) -> None:
        self.syncs += 1
        frame = sys._getframe(1)
        while frame is not None and ("/torch/" in frame.f_code.co_filename
                                     or frame.f_code.co_filename.endswith("coder/syncs.py")):
            frame = frame.f_back
        self.where[f"{kind} at {_short(frame.f_code.co_filename, frame.f_lineno)}" if frame else kind] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {}, self)

    def __enter__(self):
        self._factories = _FunctionLevel(self)
        self._factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._factories.__exit__(*exc)


def _next_sequence_nr() -> int:
    """The sequence number autograd gives the next node it creates (nodes are numbered in creation order)."""
    with torch.enable_grad():
        return (torch.ones((), requires_grad=True) * 1).grad_fn._sequence_nr() + 1


class _FunctionLevel(TorchFunctionMode):
    """What the dispatch level cannot see as CUDA runs it: `torch.tensor(data, device=...)` builds on the
    device without an aten op (on CUDA a blocking host -> device copy), and an RNN call (a chain of per-step
    ops on the CPU, one cuDNN call on CUDA, and one for its backward: the autograd nodes it creates)."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _on_device(kwargs.get("device")):
            self.counter.note("blocking host-to-device copy")
            return DeviceDouble(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        if getattr(func, "__name__", None) in RNN_CALLS and any(_is_double(a) for a in _flat(args, kwargs)):
            start = _next_sequence_nr()
            self.counter.rnn_depth += 1
            try:
                out = func(*args, **kwargs)
            finally:
                self.counter.rnn_depth -= 1
            self.counter.rnn_calls.append((start, _next_sequence_nr()))
            self.counter.ops += 1
            self.counter.kernels["rnn (one cuDNN call)"] += 1
            return out
        return func(*args, **kwargs)


def _short(path: str, line: int) -> str:
    for root in ("/coder/", "/benchmarks/", "/tests/"):
        if root in path:
            path = root.strip("/") + "/" + path.split(root)[-1]
            break
    return f"{path}:{line}"


def to_device_double(x):
    """A tensor (or a Lengths, or a dict/list of them) as `DeviceDouble`s, as `.to(cuda)` would move it."""
    return tree_map(lambda t: DeviceDouble(t) if torch.is_tensor(t) and not _is_double(t) else t, x)


def module_to_device_double(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Every parameter and buffer of `module` as a `DeviceDouble`, as `module.to(cuda)` would. The parameters
    are new objects: an `optimizer` built before is pointed at them, its state moved with them."""
    moved = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and not _is_double(p):
                moved[p] = m._parameters[name] = nn.Parameter(DeviceDouble(p.data), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and not _is_double(b):
                m._buffers[name] = DeviceDouble(b)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [moved.get(p, p) for p in group["params"]]
        state = {moved.get(p, p): to_device_double(s) for p, s in optimizer.state.items()}
        optimizer.state.clear()
        optimizer.state.update(state)
    return module


@contextmanager
def collectives_on_device_doubles():
    """torch.distributed's all_gather, all_reduce and broadcast on `DeviceDouble`s (on their CPU data, in
    place), for gloo: c10d runs below the dispatch modes, and refuses a `meta` tensor. A collective is not
    counted as a sync (NCCL's run on the device's stream; the host does not wait for them)."""
    import torch.distributed as dist

    names = ("all_gather", "all_reduce", "broadcast")
    originals = {name: getattr(dist, name) for name in names}

    def unwrap(x):
        return [_unwrap(t) for t in x] if isinstance(x, list) else _unwrap(x)

    def patched(original):
        return lambda *args, **kwargs: original(*(unwrap(a) for a in args), **kwargs)
    for name in names:
        setattr(dist, name, patched(originals[name]))
    try:
        yield
    finally:
        for name in names:
            setattr(dist, name, originals[name])
