"""Conformance with the peers' own code: the same weights and batch in, the same outputs and gradients out.

CODER's code is not public; what it is built from is. This harness imports the peers' modules from source
checkouts the user names, copies our weights into them through the state-dict mappings below, feeds both
sides the same batch (float64 wherever both sides allow it), and compares the outputs and every parameter
gradient. The peers' code never enters this repository.

    CODER_PEER_VSE_INFTY=<checkout of woodfrog/vse_infty, master> \\
    CODER_PEER_VSE_INFTY_BIGRU=<the same repository, bigru branch> \\
    CODER_PEER_USER=<checkout of zhangy0822/USER> \\
    CODER_PEER_CVSE=<checkout of BruceW91/CVSE> \\
    python benchmarks/conformance.py [--only vse_infty vse_infty_bigru user cvse] [--markdown]

A checkout's commit, shown in every row as repository@commit, is its `git rev-parse HEAD`; a source tree
without its .git (exported with `git archive`, as a branch from a mirror) names it in `<variable>_COMMIT`
(CODER_PEER_VSE_INFTY_BIGRU_COMMIT=<the bigru branch's commit>), else the row says "unknown".

A peer whose variable is unset is skipped with the reason. The table has one row per comparison: the
largest absolute difference of the outputs and of the gradients (ours against the peer's, parameter by
parameter through the mapping, and the inputs' gradients), the tolerance, and the verdict. Rows marked
"departure" show a difference we keep on purpose (docs/conformance.md gives the reason); they are not
counted. The last line is `N of M comparisons conform`; the exit status is 1 when any comparison differs
beyond its tolerance (or a peer's module cannot be imported), 0 otherwise.

Run-time patches (the peers' files are not edited), in the approach of the shared peer harness
(`peer_vse.py`, PEER.md):
  Q1 modules a peer imports at its top but the compared code never calls are stubbed when absent
     (cv2, imageio, tensorboard_logger, torchtext, turtle, nltk);
  Q2 `BertModel.from_pretrained('bert-base-uncased')` inside the peer returns a copy of our (tiny) BERT, and the
     peer's hard-coded `nn.Linear(768, embed)` is rebuilt for its hidden size;
  Q3 `torch.Tensor(lengths).cuda()` in the peers' VSE models is a no-op without CUDA;
  Q4 `np.int` (removed in NumPy 1.24) is `int` for CVSE's adjacency builder.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import pickle
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from coder.errors import CoderError  # noqa: E402


class ConformanceError(CoderError):
    """A peer checkout or a state-dict mapping is wrong (a missing file, a name or shape that does not match)."""


# ------------------------------------------------------------------------------------------------ machinery
@dataclass
class Row:
    module: str
    peer: str
    out_diff: float
    grad_diff: float
    tol: float
    note: str = ""
    departure: bool = False  # a difference we keep on purpose: shown, not counted

    @property
    def conforms(self) -> bool:
        return (math.isfinite(self.out_diff) and math.isfinite(self.grad_diff)
                and self.out_diff <= self.tol and self.grad_diff <= self.tol)


@dataclass
class Link:
    """One entry of a state-dict mapping: our tensor `ours` <-> the peer's tensor(s) `peers`.

    `transpose`: the peer stores the matrix transposed (CVSE's GraphConvolution keeps (in, out)). Several peer
    names mean one of our parameters plays the part of several peer parameters (a shared module): the weights
    are copied to each and the peer's gradients are summed."""

    ours: str
    peers: tuple[str, ...]
    transpose: bool = False

    def to_peer(self, t: torch.Tensor) -> torch.Tensor:
        return t.t() if self.transpose else t


def link(ours: str, peer: str | tuple[str, ...] | list[str], transpose: bool = False) -> Link:
    return Link(ours, (peer,) if isinstance(peer, str) else tuple(peer), transpose)


def prefixed(mapping: list[Link], ours: str, peer: str) -> list[Link]:
    """The mapping of a sub-module, with both sides' prefixes added."""
    return [Link(ours + m.ours, tuple(peer + p for p in m.peers), m.transpose) for m in mapping]


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (deduplicated, as named_parameters gives them) and buffers by name."""
    out = dict(module.named_parameters())
    out.update(module.named_buffers())
    return out


def copy_weights(ours: nn.Module, peer: nn.Module, mapping: list[Link], unmapped_peer: tuple[str, ...] = ()) -> None:
    """Copy our tensors into the peer's through `mapping`. Every parameter of ours must be mapped; every peer
    parameter must be mapped or listed in `unmapped_peer` (parameters the peer has and never uses, or that we
    do not have on purpose): otherwise a ConformanceError names it."""
    mine, theirs = _tensors(ours), _tensors(peer)
    mapped_peer = set()
    for m in mapping:
        if m.ours not in mine:
            raise ConformanceError(f"mapping names our tensor '{m.ours}', which {type(ours).__name__} does not have")
        for p in m.peers:
            if p not in theirs:
                raise ConformanceError(f"mapping names the peer's tensor '{p}', which {type(peer).__name__} "
                                       f"does not have (it has {sorted(theirs)[:8]}...)")
            src = m.to_peer(mine[m.ours].detach())
            if src.shape != theirs[p].shape:
                raise ConformanceError(f"mapping {m.ours} -> {p}: shape {tuple(src.shape)} against the peer's "
                                       f"{tuple(theirs[p].shape)}")
            with torch.no_grad():
                theirs[p].copy_(src)
            mapped_peer.add(p)
    mapped_ours = {m.ours for m in mapping}
    missing = [n for n, _ in ours.named_parameters() if n not in mapped_ours]
    if missing:
        raise ConformanceError(f"our parameters {missing} have no peer counterpart in the mapping")
    extra = [n for n, _ in peer.named_parameters() if n not in mapped_peer and n not in unmapped_peer]
    if extra:
        raise ConformanceError(f"the peer's parameters {extra} are neither mapped nor listed as unmapped")


def max_abs(a, b) -> float:
    """Largest absolute difference of two tensors (or sequences of them); inf on a shape mismatch."""
    if isinstance(a, (tuple, list)):
        if len(a) != len(b):
            return math.inf
        return max((max_abs(x, y) for x, y in zip(a, b)), default=0.0)
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def compare(module: str, peer_label: str, ours: nn.Module, peer: nn.Module, mapping: list[Link],
            run_ours: Callable[[], object], run_peer: Callable[[], object], tol: float,
            inputs: tuple[tuple[torch.Tensor, torch.Tensor], ...] = (), unmapped_peer: tuple[str, ...] = (),
            seed: int = 0, note: str = "", departure: bool = False, copy: bool = True) -> Row:
    """Copy our weights into the peer (`copy`), run both, compare outputs; then backpropagate the same random
    projection of the outputs on both sides and compare every mapped parameter's gradient (summed over its
    peer names), the gradients of `inputs` ((ours, peer) leaf pairs) and check that the peer's unmapped
    parameters got none (or zero)."""
    if copy:
        copy_weights(ours, peer, mapping, unmapped_peer)
    for module_ in (ours, peer):
        module_.zero_grad(set_to_none=True)
    for a, b in inputs:
        a.grad = b.grad = None
    out_ours, out_peer = _flat(run_ours()), _flat(run_peer())
    out_diff = max_abs([o.detach() for o in out_ours], [o.detach() for o in out_peer])
    gen = torch.Generator().manual_seed(seed)
    probes = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in out_ours]
    grad_diff = 0.0
    if math.isfinite(out_diff) and any(o.requires_grad for o in out_ours):
        for outs in (out_ours, out_peer):
            loss = sum((o * p.to(o)).sum() for o, p in zip(outs, probes) if o.requires_grad)
            loss.backward()
        mine, theirs = dict(ours.named_parameters()), dict(peer.named_parameters())
        for m in mapping:
            if m.ours not in mine:
                continue  # a buffer
            g_ours = mine[m.ours].grad
            g_peer = [theirs[p].grad for p in m.peers]
            if g_ours is None and all(g is None for g in g_peer):
                continue
            if g_ours is None or any(g is None for g in g_peer):
                grad_diff = math.inf
                continue
            grad_diff = max(grad_diff, max_abs(m.to_peer(g_ours), sum(g_peer)))
        for a, b in inputs:
            if a.grad is not None or b.grad is not None:
                grad_diff = max(grad_diff, math.inf if a.grad is None or b.grad is None else max_abs(a.grad, b.grad))
        for name in unmapped_peer:
            g = theirs[name].grad if name in theirs else None
            if g is not None:
                grad_diff = max(grad_diff, float(g.abs().max()))
    return Row(module, peer_label, out_diff, grad_diff, tol, note, departure)


# ------------------------------------------------------------------------------------------------ peers
@dataclass
class Peer:
    key: str
    env: str
    repo: str
    marker: str  # a file the checkout must have
    rows: Callable[["Peer", Path], list[Row]] | None = None
    commit: str = field(default="")
    branch: str = ""  # where the checkout must be of a branch other than the repository's default

    @property
    def source(self) -> str:
        return f"{self.repo} ({self.branch} branch)" if self.branch else self.repo

    @property
    def label(self) -> str:
        """repository@commit, as the table's peer column shows it."""
        return f"{self.repo}@{self.commit}" + (f" ({self.branch})" if self.branch else "")


def peer_commit(path: Path, env: str = "") -> str:
    """The checkout's commit, 12 hex digits: `git rev-parse HEAD` where `path` is the top of a git work tree
    (a folder inside another repository's tree is not taken for that repository's commit); otherwise, for
    a source tree without its .git (a `git archive` extract, or a branch such as vse_infty's `bigru` exported
    from a mirror), the variable `<env>_COMMIT`, which the user sets to the commit the tree was exported from."""
    fallback = os.environ.get(f"{env}_COMMIT", "").strip() if env else ""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        out = None
    lines = out.stdout.split() if out is not None and out.returncode == 0 else []
    if len(lines) == 2 and Path(lines[0]).resolve() == Path(path).resolve():
        return lines[1][:12]
    if fallback:
        return fallback[:12]
    why = "git unavailable" if out is None else "not a git checkout"
    return f"unknown ({why}{f'; set {env}_COMMIT' if env else ''})"


STUBS = {"cv2": ("resize", "imread"), "imageio": ("imread",), "tensorboard_logger": ("configure", "log_value"),
         "torchtext": (), "turtle": ("forward",), "nltk": ()}


def _stub(name: str, attrs: tuple[str, ...]) -> None:  # Q1
    try:
        __import__(name)
    except Exception:  # noqa: BLE001 - absent, or present and broken (turtle without tkinter)
        mod = types.ModuleType(name)
        for a in attrs:
            setattr(mod, a, lambda *args, **kwargs: None)
        sys.modules[name] = mod


def import_peer(path: Path, names: list[str], patch: bool = True) -> types.SimpleNamespace:
    """Import modules `names` from the checkout `path`, first removing every module another checkout left in
    sys.modules (the peers all call their package `lib`); `patch` applies Q1 and Q4 first. Returns the modules
    by their last name part."""
    path = Path(path).resolve()
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None) or ""
        if name.split(".")[0] in ("lib", "util", "arguments", "model_CVSE", "train") and str(path) not in f:
            del sys.modules[name]
    if patch:
        for name, attrs in STUBS.items():
            _stub(name, attrs)
        if not hasattr(np, "int"):
            np.int = int  # Q4
    sys.path.insert(0, str(path))
    try:
        mods = {}
        for name in names:
            __import__(name)
            mods[name.split(".")[-1]] = sys.modules[name]
    except ImportError as err:
        raise ConformanceError(f"cannot import '{name}' from the peer checkout {path}: {err}") from err
    finally:
        sys.path.remove(str(path))
    return types.SimpleNamespace(**mods)


class _BertShim:  # Q2
    bert: nn.Module | None = None

    @classmethod
    def from_pretrained(cls, name, *args, **kwargs):
        return copy.deepcopy(cls.bert)


class _CpuLengths:  # Q3
    def __init__(self, t):
        self.t = t

    def cuda(self, *args, **kwargs):
        return self.t


class _TorchNoCuda(types.ModuleType):  # Q3: a proxy of torch whose torch.Tensor(x).cuda() is a no-op
    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def Tensor(*args, **kwargs):
        return _CpuLengths(torch.Tensor(*args, **kwargs))


def _peer_text_encoder(encoders, bert: nn.Module, embed: int) -> nn.Module:
    """The peer's EncoderText around a copy of `bert` (Q2)."""
    encoders.BertModel = _BertShim
    _BertShim.bert = bert
    enc = encoders.EncoderText(embed)
    enc.linear = nn.Linear(bert.config.hidden_size, embed)
    return enc


# ------------------------------------------------------------------------------------------------ mappings
GPO_MAP = [link("score.weight", "linear.weight")] + [
    link(f"gru.{kind}_{w}_l0{rev}", f"gru.{kind}_{w}_l0{rev}")
    for kind in ("weight", "bias") for w in ("ih", "hh") for rev in ("", "_reverse")]
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# our ImageHead <- VSE-infinity's EncoderImageAggr (lib/encoders.py, lib/modules/mlp.py)
IMAGE_HEAD_MAP = [link("fc.weight", "fc.weight"), link("fc.bias", "fc.bias"),
                  link("mlp.0.weight", "mlp.layers.0.weight"), link("mlp.0.bias", "mlp.layers.0.bias"),
                  link("mlp.3.weight", "mlp.layers.1.weight"), link("mlp.3.bias", "mlp.layers.1.bias"),
                  *[link(f"mlp.1.{b}", f"mlp.bns.0.{b}") for b in BN],
                  *prefixed(GPO_MAP, "aggregate.", "gpool.")]
IMAGE_HEAD_UNUSED = ("mlp.bns.1.weight", "mlp.bns.1.bias")  # MLP builds a BN after its last layer, never applies it
# our TextEncoder <- the peer's EncoderText (BERT, linear, GPO)
def text_encoder_map(bert: nn.Module) -> list[Link]:
    return ([link("backbone.bert." + n, "bert." + n) for n, _ in _tensors(bert).items()]
            + [link("head.fc.weight", "linear.weight"), link("head.fc.bias", "linear.bias")]
            + prefixed(GPO_MAP, "head.aggregate.", "gpool."))


# our SelfGuidedEnhancement <- USER's SGE (lib/encoders.py)
SGE_MAP = [link("local_linear.weight", "embedding_local.0.weight"), link("local_linear.bias", "embedding_local.0.bias"),
           *[link(f"local_bn.{b}", f"embedding_local.1.{b}") for b in BN],
           link("global_linear.weight", "embedding_global.0.weight"),
           link("global_linear.bias", "embedding_global.0.bias"),
           *[link(f"global_bn.{b}", f"embedding_global.1.{b}") for b in BN],
           link("attention_logit.weight", "embedding_common.0.weight")]
SGE_UNMAPPED = ("embedding_common.0.bias",)  # cancels in the softmax over regions: no gradient, so we dropped it


# our ConceptQuery(encoder cvse, score cvse) <- CVSE's Consensus_level_feature_learning (model_CVSE.py)
def consensus_map(peer_prefixes: tuple[str, ...] = ("",)) -> list[Link]:
    pairs = [("query_encoder.fc.weight", "fc2.weight"), ("query_encoder.fc.bias", "fc2.bias"),
             ("basis_encoder.fc.weight", "fc1.weight"), ("basis_encoder.fc.bias", "fc1.bias"),
             ("scorer.weight", "fc3.weight"), ("scorer.bias", "fc3.bias"),
             *[(f"query_encoder.bn.{b}", f"embedding_2.1.{b}") for b in BN],
             *[(f"basis_encoder.bn.{b}", f"embedding_1.1.{b}") for b in BN]]
    return [link(o, tuple(pre + p for pre in peer_prefixes)) for o, p in pairs]


GCN_MAP = [link("layer1.weight", "gc1.weight", transpose=True), link("layer2.weight", "gc2.weight", transpose=True)]


def _lengths_batch(gen, batch, width, dim, lengths, dtype=torch.float64):
    x = torch.randn(batch, width, dim, generator=gen, dtype=dtype).relu()  # non-negative, as BUTD features
    mask = torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]
    return (x * mask[..., None]).requires_grad_(), torch.as_tensor(lengths)


def _leaf_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()


# ------------------------------------------------------------------------------------------------ VSE-infinity
F64 = 1e-10  # float64 on both sides
L2_EPS = 1e-6  # float64, but the peer's l2norm divides by (norm + 1e-8) where we divide by the norm
F32 = 1e-4  # a float32 part on both sides (GPO's position encodings and GRU, CVSE's adjacency)


def vse_rows(peer: Peer, path: Path) -> list[Row]:
    from coder.models.aggregators import GPO
    from coder.models.heads import ImageHead, TextHead
    from coder.models.model import TextEncoder
    from coder.models.text import TextBackbone, tiny_bert

    P = import_peer(path, ["lib.encoders", "lib.modules.aggr.gpo", "lib.loss", "lib.vse", "arguments"])
    label = peer.label
    rows = []
    gen = torch.Generator().manual_seed(0)
    batch, width, dim, embed = 6, 7, 16, 12
    lengths = [7, 3, 5, 7, 1, 4]

    # GPO (features float64; the position encodings and GRU are float32 on both sides)
    torch.manual_seed(1)
    ours, theirs = GPO(), P.gpo.GPO(32, 32)
    feats, lens = _lengths_batch(gen, batch, width, embed, lengths)
    a, b = _leaf_pair(feats)
    rows.append(compare("GPO (aggregator)", label, ours, theirs, GPO_MAP, lambda: ours(a, lens),
                        lambda: theirs(b, lens)[0], F32, inputs=((a, b),),
                        note="float32 position encodings + GRU on both sides"))

    # the precomp image encoder with GPO: train mode, every image with all its regions
    torch.manual_seed(2)
    ours, theirs = ImageHead(dim, embed, "gpo").double(), P.encoders.EncoderImageAggr(dim, embed, "basic").double()
    for m in (ours.aggregate, theirs.gpool):
        m.float()
    full = [width] * batch
    regions, full_lens = _lengths_batch(gen, batch, width, dim, full)
    a, b = _leaf_pair(regions)
    rows.append(compare("EncoderImageAggr, train mode, all regions", label, ours, theirs, IMAGE_HEAD_MAP,
                        lambda: ours(a, full_lens), lambda: theirs(b, full_lens), F32, inputs=((a, b),),
                        unmapped_peer=IMAGE_HEAD_UNUSED))
    regions, lens = _lengths_batch(gen, batch, width, dim, lengths)
    ours.eval(), theirs.eval()
    a, b = _leaf_pair(regions)
    rows.append(compare("EncoderImageAggr, eval mode, padded", label, ours, theirs, IMAGE_HEAD_MAP,
                        lambda: ours(a, lens), lambda: theirs(b, lens), F32, inputs=((a, b),),
                        unmapped_peer=IMAGE_HEAD_UNUSED))
    ours.train(), theirs.train()
    a, b = _leaf_pair(regions)
    rows.append(compare("EncoderImageAggr, train mode, padded", label, ours, theirs, IMAGE_HEAD_MAP,
                        lambda: ours(a, lens), lambda: theirs(b, lens), F32, inputs=((a, b),),
                        unmapped_peer=IMAGE_HEAD_UNUSED, departure=True,
                        note="our MLP's BatchNorm sees real regions only; the peer's also the zero padding "
                             "(model.mlp_bn_padding: true restores it, next row)"))
    ours.bn_padding = True
    a, b = _leaf_pair(regions)
    rows.append(compare("EncoderImageAggr, train mode, padded, model.mlp_bn_padding: true", label, ours, theirs,
                        IMAGE_HEAD_MAP, lambda: ours(a, lens), lambda: theirs(b, lens), F32, inputs=((a, b),),
                        unmapped_peer=IMAGE_HEAD_UNUSED))
    rows += vse_init_rows(P, label, dim, embed)

    # the BERT text encoder with its projection and GPO (a tiny random BERT, copied); eval mode: no dropout
    bert = tiny_bert(vocab_size=100, hidden=16, layers=2, heads=2).double()
    torch.manual_seed(3)
    ours = TextEncoder(TextBackbone(copy.deepcopy(bert)), TextHead(16, embed, "gpo")).double()
    theirs = _peer_text_encoder(P.encoders, bert, embed).double()
    for m in (ours.head.aggregate, theirs.gpool):
        m.float()
    ours.eval(), theirs.eval()
    tok_len = torch.tensor([9, 4, 6, 9, 2, 5])
    ids = torch.randint(1, 100, (batch, 9), generator=gen) * (torch.arange(9)[None] < tok_len[:, None])
    rows.append(compare("EncoderText (BERT + linear + GPO)", label, ours, theirs, text_encoder_map(ours.backbone.bert),
                        lambda: ours(ids, tok_len)[0], lambda: theirs(ids, tok_len.double()), F32,
                        note="tiny random BERT (2 layers, H16) copied; ours packs real tokens"))

    rows += vse_loss_rows(P, label, gen)
    rows += vse_schedule_rows(P, path, label)
    return rows


def vse_init_rows(P, label: str, dim: int, embed: int) -> list[Row]:
    """The image encoder's initial weights from the same seed: with model.image_fc_init: xavier ours draws what
    the peer draws (the same layers in the same order, FC redrawn last); PyTorch's default FC init is a
    departure."""
    from coder.models.heads import ImageHead
    rows = []
    for init in ("xavier", "torch"):
        torch.manual_seed(11)
        ours = ImageHead(dim, embed, "gpo", fc_init=init)
        torch.manual_seed(11)
        theirs = P.encoders.EncoderImageAggr(dim, embed, "basic")
        mine, peers = _tensors(ours), _tensors(theirs)
        diff = max(max_abs(mine[m.ours], peers[m.peers[0]]) for m in IMAGE_HEAD_MAP)
        rows.append(Row(f"EncoderImageAggr initial weights from one seed, model.image_fc_init: {init}", label, diff,
                        0.0, 1e-6, departure=init == "torch",
                        note="float32: the same draws"
                        if init == "xavier" else "PyTorch's default FC init (kaiming-uniform weights, non-zero bias)"))
    return rows


def vse_loss_rows(P, label: str, gen) -> list[Row]:
    from coder.losses.triplet import triplet
    rows = []
    n, d = 8, 6
    x = nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    y = nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    for hardest, name in ((False, "triplet, all negatives (VSE0)"), (True, "triplet, hardest negatives (VSE++)")):
        im_a, im_b = _leaf_pair(x)
        s_a, s_b = _leaf_pair(y)
        crit = P.loss.ContrastiveLoss(opt=None, margin=0.2, max_violation=hardest)
        rows.append(compare(name, label, nn.Module(), nn.Module(), [], lambda: triplet(im_a @ s_a.t(), 0.2, hardest),
                            lambda: crit(im_b, s_b), F64, inputs=((im_a, im_b), (s_a, s_b))))
    return rows


def vse_schedule_rows(P, path: Path, label: str) -> list[Row]:
    """Our optimizer (configs/baselines/f30k_vse.yaml) against the peer's: train.py's own main() with
    train_region.sh's arguments, its data, training and validation stubbed, records each epoch's loss switch
    and every parameter group's learning rate; ours reads the same from coder.engine and the triplet term."""
    from coder.config import load_config
    from coder.engine import build_optimizer
    from coder.models.model import build_itr_model
    from coder.models.text import tiny_bert

    cfg = load_config(ROOT / "configs" / "baselines" / "f30k_vse.yaml", ["model.region_dim=16", "model.embed_dim=12"])
    bert = tiny_bert(vocab_size=100, hidden=16, layers=1, heads=2)
    model = build_itr_model(cfg["model"], copy.deepcopy(bert))
    optimizer = build_optimizer(model, cfg["train"], model.text_encoder.backbone)
    T = import_peer(path, ["train"]).train
    P.encoders.BertModel = _BertShim  # Q2
    _BertShim.bert = bert
    P.vse.torch = _TorchNoCuda("torch")  # Q3
    orig_text = P.vse.get_text_encoder

    def get_text_encoder(embed_size, no_txtnorm=False):  # Q2: the linear for our BERT's hidden size
        enc = orig_text(embed_size, no_txtnorm=no_txtnorm)
        enc.linear = nn.Linear(bert.config.hidden_size, embed_size)
        return enc
    with tempfile.TemporaryDirectory() as tmp:
        seen = _peer_epochs(T, tmp, [
            (T, {"BertTokenizer": types.SimpleNamespace(from_pretrained=lambda *_a, **_k: types.SimpleNamespace(
                vocab=dict.fromkeys(range(100))))}),
            (P.vse, {"get_text_encoder": get_text_encoder})], ["--embed_size", "12", "--img_dim", "16"])
    # parameter names: ours -> the peer's (data-parallel: .module.)
    names = {m.ours: m.peers[0] for m in prefixed(IMAGE_HEAD_MAP, "image_encoder.head.", "img_enc.module.")
             + prefixed(text_encoder_map(model.text_encoder.backbone.bert), "text_encoder.", "txt_enc.module.")}
    return schedule_rows(label, cfg, model, optimizer, seen, names, "BERT 0.1x",
                         tuple("img_enc.module." + n for n in IMAGE_HEAD_UNUSED))


# train_region.sh's arguments (master and bigru alike), the peer's data and log folders under a scratch folder
TRAIN_REGION_ARGS = ["--num_epochs=25", "--lr_update=15", "--learning_rate=.0005", "--precomp_enc_type", "basic",
                     "--workers", "0", "--log_step", "200", "--vse_mean_warmup_epochs", "1"]


def _peer_epochs(T, tmp: str, patches: list[tuple[object, dict]], args: list[str]) -> list[tuple[int, dict]]:
    """Run the peer's train.py main() with train_region.sh's arguments and `args`, its data loading,
    per-epoch training, validation and checkpointing stubbed (and `patches`, (object, attributes) pairs):
    (epoch, the model's state at the start of the epoch) for each epoch."""
    seen = []
    if not logging.getLogger().handlers:  # train.py's logging.basicConfig(INFO) would print to stderr
        logging.getLogger().addHandler(logging.NullHandler())
    argv = ["train.py", "--data_path", tmp, "--data_name", "f30k_precomp", "--logger_name", tmp + "/log",
            "--model_name", tmp + "/model", *TRAIN_REGION_ARGS, *args]
    with contextlib.ExitStack() as stack:
        record = lambda opt, loader, model, epoch, val: seen.append((epoch, _peer_state(model)))  # noqa: E731
        for obj, attrs in [(T, {"train": record, "validate": lambda *a, **k: 0.0,
                                "save_checkpoint": lambda *a, **k: None}),
                           (T.image_caption, {"get_loaders": lambda *a, **k: (None, None)}),
                           (sys, {"argv": argv}), *patches]:
            stack.enter_context(_patched(obj, attrs))
        stack.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))
        T.main()
    return seen


def schedule_rows(label: str, cfg: dict, model: nn.Module, optimizer, seen: list[tuple[int, dict]],
                  names: dict[str, str], lr_what: str, peer_unused: tuple[str, ...] = ()) -> list[Row]:
    """Our optimizer's per-parameter learning rate and weight decay at each epoch (coder.engine.lr_at and the
    parameter groups; `names` maps our parameter names to the peer's) and which triplet form the registered
    loss computes, against what the peer's train.py set at the start of each epoch (`seen`). Every parameter
    of ours must have its peer name, and every parameter the peer optimizes a counterpart of ours, except
    `peer_unused` (parameters the peer never uses)."""
    from coder.engine import lr_at
    from coder.losses import INSTANCE_LOSSES, LossInputs
    from coder.losses.triplet import triplet

    peer_params = dict(seen[0][1]["model"]["params"])
    gen = torch.Generator().manual_seed(12)
    v = nn.functional.normalize(torch.randn(8, 6, generator=gen, dtype=torch.float64), dim=1)
    w = nn.functional.normalize(torch.randn(8, 6, generator=gen, dtype=torch.float64), dim=1)
    sims, margin = v @ w.t(), cfg["loss"]["margin"]

    def ours_hardest(epoch: int) -> bool | None:
        """Which form the registered loss (loss.instance: triplet) computes at this epoch: VSE++ or VSE0."""
        got = INSTANCE_LOSSES[cfg["loss"]["instance"]].batch(LossInputs({"v_i": v, "w_i": w}, {}, epoch, None,
                                                                        cfg["loss"]))
        hard, every = triplet(sims, margin, True), triplet(sims, margin, False)
        if not (torch.isclose(got, hard) or torch.isclose(got, every)) or torch.isclose(hard, every):
            return None
        return bool(torch.isclose(got, hard))
    lr_diff, switch_diff, wd_diff, missing = 0.0, 0.0, 0.0, []
    ours_by_param = {}
    for epoch, state in seen:
        lr = lr_at(cfg["train"], epoch)
        for group in optimizer.param_groups:
            for p in group["params"]:
                ours_by_param[id(p)] = (lr * group["lr_mult"], group["weight_decay"])
        for name, p in model.named_parameters():
            if name not in names or names[name] not in peer_params:
                missing.append(name)
                continue
            peer_lr, peer_wd = state["lr"][names[name]]
            lr_diff = max(lr_diff, abs(ours_by_param[id(p)][0] - peer_lr))
            wd_diff = max(wd_diff, abs(ours_by_param[id(p)][1] - peer_wd))
        switch_diff = max(switch_diff, float(ours_hardest(epoch) != state["max_violation"]))
    unmatched = sorted(set(peer_params) - set(peer_unused) - {names[n] for n, _ in model.named_parameters()
                                                              if n in names})
    epochs = len(seen)
    rows = [Row(f"optimizer: per-parameter lr ({lr_what}) at each of {epochs} epochs, weight decay", label,
                math.inf if missing or unmatched else max(lr_diff, wd_diff), 0.0, 1e-12,
                f"AdamW both: {type(optimizer).__name__} / {seen[0][1]['optimizer']}; "
                f"{len(peer_params)} parameters; grad clip {cfg['train']['grad_clip']} / {seen[0][1]['clip']}"),
            Row(f"triplet warm-up switch (VSE0 -> VSE++) at each of {epochs} epochs", label, switch_diff, 0.0, 0.0,
                f"VSE++ from epoch {min(e for e, st in seen if st['max_violation'])}; ours: the registered loss "
                "'triplet' at each epoch")]
    if type(optimizer).__name__ != seen[0][1]["optimizer"] or cfg["train"]["grad_clip"] != seen[0][1]["clip"]:
        rows[0].out_diff = math.inf
    return rows


def _peer_state(model) -> dict:
    """The peer model's state at the start of an epoch: every parameter's (lr, weight decay), the loss switch."""
    params = {}
    named = {id(p): n for n, p in list(model.img_enc.named_parameters(prefix="img_enc"))
             + list(model.txt_enc.named_parameters(prefix="txt_enc"))}
    for group in model.optimizer.param_groups:
        for p in group["params"]:
            params[named[id(p)]] = (group["lr"], group["weight_decay"])
    return {"lr": params, "max_violation": bool(model.criterion.max_violation), "model": {"params": params},
            "optimizer": type(model.optimizer).__name__, "clip": model.grad_clip}


@contextlib.contextmanager
def _patched(obj, attrs: dict):
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


# ------------------------------------------------------------------------------------------------ USER
def _no_dropout(*modules: nn.Module) -> None:
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0


class _Recorder(nn.Module):
    """Stands in for our objective (and USER's UTO.moco_forward): records what the loss is given."""

    batch_fields: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, out, batch, epoch, bank, labels):  # our Objective's signature
        self.seen.append({k: v.detach().clone() for k, v in out.items()} | {"bank": [t.clone() for t in bank]})
        return out["v_i"].sum() * 0, {}, {}

    def moco_forward(self, v_q, t_k, t_q, v_k, v_queue, t_queue):  # USER's lib/loss.py signature
        self.seen.append({"v_key": v_k.detach().clone(), "w_key": t_k.detach().clone(),
                          "bank": [v_queue.t().clone(), t_queue.t().clone()]})
        return v_q.sum() * 0


def user_rows(peer: Peer, path: Path) -> list[Row]:
    from coder.config import load_config
    from coder.models.heads import ImageHead
    from coder.models.model import ImageEncoder, build_itr_model
    from coder.models.momentum import MomentumContrast
    from coder.models.text import tiny_bert
    from coder.models.user import SelfGuidedEnhancement
    from coder.step import ContrastiveStep

    P = import_peer(path, ["lib.encoders", "lib.vse"])
    label = peer.label
    rows = []
    gen = torch.Generator().manual_seed(10)
    batch, regions_n, dim, embed = 4, 36, 16, 12  # USER's encoder hard-codes 36 regions
    opt = argparse.Namespace(attention_lamda=1, precomp_enc_type="basic", use_moco=1)

    # SGE, train mode: the same dropout masks from the same seed (both draw local, then global)
    torch.manual_seed(4)
    ours = SelfGuidedEnhancement(dim, regions_n, 0.4, 1.0).double()
    theirs = P.encoders.SGE(dim, 0.4, regions_n, opt=opt).double()
    regions, full = _lengths_batch(gen, batch, regions_n, dim, [regions_n] * batch)
    a, b = _leaf_pair(regions)

    def seeded(f):
        torch.manual_seed(123)
        return f()
    rows.append(compare("SGE (self-guided enhancement), train mode", label, ours, theirs, SGE_MAP,
                        lambda: seeded(lambda: ours(a, full)), lambda: seeded(lambda: theirs(b, b.mean(1))), L2_EPS,
                        inputs=((a, b),), unmapped_peer=SGE_UNMAPPED,
                        note="float64; USER's l2norm adds 1e-8 to the norm; its attention-logit bias is not ours: "
                             "its gradient is checked zero"))

    # USER's image encoder: SGE, then VSE-infinity's head
    torch.manual_seed(5)
    ours = ImageEncoder(ImageHead(dim, embed, "gpo"), SelfGuidedEnhancement(dim, regions_n, 0.4, 1.0)).double()
    theirs = P.encoders.EncoderImageAggr(dim, embed, "basic", opt=opt).double()
    for m in (ours.head.aggregate, theirs.gpool):
        m.float()
    image_map = prefixed(SGE_MAP, "sge.", "v_sa.") + prefixed(IMAGE_HEAD_MAP, "head.", "")
    image_unmapped = tuple("v_sa." + n for n in SGE_UNMAPPED) + IMAGE_HEAD_UNUSED
    a, b = _leaf_pair(regions)
    rows.append(compare("EncoderImageAggr with SGE, train mode", label, ours, theirs, image_map,
                        lambda: seeded(lambda: ours(a, full)), lambda: seeded(lambda: theirs(b, full)), F32,
                        inputs=((a, b),), unmapped_peer=image_unmapped))

    rows += user_momentum_rows(P, label, gen, load_config, build_itr_model, tiny_bert, ContrastiveStep,
                               MomentumContrast, image_map, image_unmapped, opt)
    return rows


def user_momentum_rows(P, label, gen, load_config, build_itr_model, tiny_bert, ContrastiveStep, MomentumContrast,
                       image_map, image_unmapped, opt) -> list[Row]:
    """Five training steps' worth of momentum update, keys, what the loss reads from the queues and the
    enqueue, through our ContrastiveStep and through USER's own USER.forward_emb (its queue of K = 3 batches
    wraps around at the fourth). Between steps the query encoders change (as an optimizer step would), on
    both sides alike. Dropout is off: the comparison is of the momentum machinery, not of dropout masks."""
    batch, steps, m, K = 4, 5, 0.9, 12
    cfg = load_config(ROOT / "configs" / "f30k_user.yaml", [
        "model.region_dim=16", "model.embed_dim=12", f"model.momentum.queue_size={K}", f"model.momentum.m={m}",
        "model.user.cge=false", "data.clip_features=false"])
    bert = tiny_bert(vocab_size=100, hidden=16, layers=1, heads=2)
    _no_dropout(bert)
    torch.manual_seed(6)
    model = build_itr_model(cfg["model"], copy.deepcopy(bert)).double()
    for agg in (model.image_encoder.head.aggregate, model.text_encoder.head.aggregate):
        agg.float()
    _no_dropout(model)
    mom = MomentumContrast(model.image_encoder, model.text_encoder, cfg["model"]["embed_dim"], K, m)
    recorder = _Recorder()
    step = ContrastiveStep(model, recorder, mom).train()
    with torch.no_grad():  # key encoders away from the queries, so the momentum update shows
        for p in list(mom.key_image_encoder.parameters()) + list(mom.key_text_encoder.parameters()):
            p.add_(0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype))

    P.encoders.BertModel, _BertShim.bert = _BertShim, bert  # Q2
    img = P.encoders.EncoderImageAggr(16, 12, "basic", opt=opt)
    txt = _peer_text_encoder(P.encoders, bert, 12)
    ns = types.SimpleNamespace(opt=opt, img_enc=img, txt_enc=txt, v_encoder_k=copy.deepcopy(img),
                               t_encoder_k=copy.deepcopy(txt), m=m, K=K, hal_loss=_Recorder())
    for mod in (img, txt, ns.v_encoder_k, ns.t_encoder_k):
        mod.double()
        mod.gpool.float()
        _no_dropout(mod)
        mod.train()
    text_map = text_encoder_map(model.text_encoder.backbone.bert)
    copy_weights(model.image_encoder, img, image_map, image_unmapped)
    copy_weights(model.text_encoder, txt, text_map)
    copy_weights(mom.key_image_encoder, ns.v_encoder_k, image_map, image_unmapped)
    copy_weights(mom.key_text_encoder, ns.t_encoder_k, text_map)
    ns.v_queue = mom.queue_v.features.t().clone()  # USER keeps (D, K); the random start copied from ours
    ns.t_queue = mom.queue_w.features.t().clone()
    ns.queue_ptr = torch.zeros(1, dtype=torch.long)
    ns._momentum_update_key_encoder = types.MethodType(P.vse.USER._momentum_update_key_encoder, ns)
    ns._dequeue_and_enqueue = types.MethodType(P.vse.USER._dequeue_and_enqueue, ns)
    P.vse.torch = _TorchNoCuda("torch")  # Q3

    d = {"keys": 0.0, "read": 0.0, "enqueued": 0.0, "params": 0.0, "emb": 0.0, "buffers": 0.0}
    for t in range(steps):
        regions = torch.randn(batch, 36, 16, generator=gen, dtype=torch.float64).relu()
        full = torch.full((batch,), 36)
        tok_len = torch.randint(2, 9, (batch,), generator=gen)
        ids = torch.randint(1, 100, (batch, 8), generator=gen) * (torch.arange(8)[None] < tok_len[:, None])
        b = {"regions": regions, "region_lengths": full, "input_ids": ids, "text_lengths": tok_len,
             "index": torch.arange(batch) + t * batch, "image_index": torch.arange(batch) + t * batch}
        step(b, epoch=0)
        v_q, t_q = P.vse.USER.forward_emb(ns, regions, ids, tok_len.tolist(), image_lengths=full,
                                          is_train=True)[:2]
        ours_seen, peer_seen = recorder.seen[-1], ns.hal_loss.seen[-1]
        d["emb"] = max(d["emb"], max_abs([ours_seen["v_i"], ours_seen["w_i"]], [v_q.detach(), t_q.detach()]))
        d["keys"] = max(d["keys"], max_abs([ours_seen["v_key"], ours_seen["w_key"]],
                                           [peer_seen["v_key"], peer_seen["w_key"]]))
        d["read"] = max(d["read"], max_abs(ours_seen["bank"][:2], peer_seen["bank"]))
        d["enqueued"] = max(d["enqueued"], max_abs([mom.queue_v.features, mom.queue_w.features],
                                                   [ns.v_queue.t(), ns.t_queue.t()]),
                            float(int(mom.queue_v.ptr) != int(ns.queue_ptr)))
        for ours_mod, peer_mod, mapping in ((mom.key_image_encoder, ns.v_encoder_k, image_map),
                                            (mom.key_text_encoder, ns.t_encoder_k, text_map)):
            mine, theirs = _tensors(ours_mod), _tensors(peer_mod)
            params = dict(ours_mod.named_parameters())
            for link_ in mapping:
                diff = max_abs(link_.to_peer(mine[link_.ours]), theirs[link_.peers[0]])
                key = "params" if link_.ours in params else "buffers"
                d[key] = max(d[key], diff)
        with torch.no_grad():  # an optimizer step's worth of change to the queries, the same on both sides
            for enc in (model.image_encoder, model.text_encoder):
                for p in enc.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        copy_weights(model.image_encoder, img, image_map, image_unmapped)
        copy_weights(model.text_encoder, txt, text_map)
    note = f"{steps} steps, batch {batch}, K {K}, m {m}"
    return [Row("momentum step: query embeddings", label, d["emb"], 0.0, F32, note + "; float32 GPO"),
            Row("momentum update of the key encoders' parameters", label, d["params"], 0.0, F32,
                note + "; MoCo's k + (1-m)(q-k) against USER's m k + (1-m) q, equal up to rounding (float32 GPO)"),
            Row("keys (momentum encoders' embeddings of the batch)", label, d["keys"], 0.0, F32, note),
            Row("queues: what the loss reads (before this step's enqueue)", label, d["read"], 0.0, F32, note),
            Row("queues after enqueue (FIFO order, wrap-around, pointer)", label, d["enqueued"], 0.0, F32, note),
            Row("key encoders' BatchNorm buffers", label, d["buffers"], 0.0, F64, departure=True,
                note="ours copies the query's running statistics; USER's key encoder keeps its own (train mode: "
                     "no effect on keys)")]


# ------------------------------------------------------------------------------------------------ CVSE
def _exact_smoothness(*queries) -> None:
    """Our lambda is kept as log lambda, a float32 buffer (log 10 rounded: lambda = 10 (1 + 3e-8)); in float64
    set it to log 10 exactly, as the peer's smooth_coef is the integer 10."""
    for q in queries:
        q.log_smoothness.data = torch.tensor(math.log(10.0), dtype=q.log_smoothness.dtype)


def cvse_rows(peer: Peer, path: Path) -> list[Row]:
    from coder.models.concept import ConceptGCN, ConceptQuery, normalized_adjacency
    from coder.models.model import ConceptBranch

    P = import_peer(path, ["util.C_GCN", "model_CVSE"])
    label = peer.label
    rows = []
    gen = torch.Generator().manual_seed(20)
    g, d_word, dim, batch = 10, 8, 12, 6
    counts = torch.randint(5, 40, (g,), generator=gen).double()
    cooc = torch.floor(torch.rand(g, g, generator=gen, dtype=torch.float64) * counts[:, None] * 0.6)
    glove = torch.randn(g, d_word, generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        adj_file = os.path.join(tmp, "adj.pkl")
        with open(adj_file, "wb") as f:
            pickle.dump({"nums": counts.numpy(), **{k: cooc.numpy().copy() for k in ("adj_all", "adj_O_P", "adj_O_M")}},
                        f)
        gcn_opt = argparse.Namespace(embed_size=dim)
        torch.manual_seed(7)
        theirs_gcn = P.C_GCN.C_GCN(g, in_channel=d_word, t=0.3, adj_file=adj_file, norm_func="sigmoid",
                                   adj_gen_mode="Complex", opt=gcn_opt)
    ours_gcn = ConceptGCN(glove, normalized_adjacency(counts, cooc), dim // 2, dim)
    gcn_unmapped = ("adj_O_P", "adj_O_M", "adj_all", "joint_att_emb.weight", "joint_att_emb.bias")
    rows.append(compare("C_GCN over the concept graph (adjacency 'Complex', t 0.3) and its output basis", label,
                        ours_gcn, theirs_gcn, GCN_MAP,
                        lambda: (ours_gcn(), ours_gcn.adjacency),
                        lambda: (theirs_gcn(None, glove[None]), P.C_GCN.gen_adj(theirs_gcn.adj_all).detach()), F32,
                        unmapped_peer=gcn_unmapped, note="float32 (CVSE's gen_adj casts to float32)"))

    def consensus():
        return P.model_CVSE.Consensus_level_feature_learning(dim, dim, True, "tanh", 0.4, g).double()

    q = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    basis_raw = torch.randn(g, dim, generator=gen, dtype=torch.float64)
    labels = (torch.rand(batch, g, generator=gen) < 0.3).double()
    normalize = nn.functional.normalize
    for modal, ratio, departure in (("visual", 0.0, False), ("textual", 0.0, False), ("textual", 0.35, True)):
        torch.manual_seed(8)
        ours, theirs = ConceptQuery(dim, 10.0, "cvse", "cvse").double(), consensus()
        _exact_smoothness(ours)
        qa, qb = _leaf_pair(q)
        ya, yb = _leaf_pair(basis_raw)
        name = f"consensus-level module, {modal}" + (f" (concept-label ratio {ratio})" if modal == "textual" else "")
        rows.append(compare(name, label, ours, theirs, consensus_map(),
                            lambda: ours(qa, normalize(ya, dim=-1), return_weights=True),
                            lambda: theirs(qb, normalize(yb, dim=-1), modal, labels, ratio), F64,
                            inputs=((qa, qb), (ya, yb)), departure=departure,
                            note="CVSE mixes the caption's concept labels into the text weights at ratio 0.35 "
                                 "(training); CODER's Eq. 2 has no labels" if departure else ""))

    # one shared query (share_query) against CVSE's two per-modality modules holding the same weights
    torch.manual_seed(9)
    ours = ConceptQuery(dim, 10.0, "cvse", "cvse").double()
    _exact_smoothness(ours)
    theirs = nn.ModuleDict({"v": consensus(), "t": consensus()})
    qv, qt = q, torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    va, vb = _leaf_pair(qv)
    ta, tb = _leaf_pair(qt)
    ya, yb = _leaf_pair(basis_raw)
    rows.append(compare("shared query (share_query) vs CVSE's V_ and T_ modules", label, ours, theirs,
                        consensus_map(("v.", "t.")),
                        lambda: (ours(va, normalize(ya, dim=-1)), ours(ta, normalize(ya, dim=-1))),
                        lambda: (theirs["v"](vb, normalize(yb, dim=-1), "visual", None, 0)[0],
                                 theirs["t"](tb, normalize(yb, dim=-1), "textual", labels, 0)[0]), F64,
                        inputs=((va, vb), (ta, tb), (ya, yb)),
                        note="gradients: ours against the sum of the two modules'"))
    # after that training step, eval mode: the shared BatchNorms' running statistics mix both modalities
    ours.eval(), theirs.eval()
    rows.append(compare("shared query (share_query), eval mode after one training step", label, ours, theirs,
                        consensus_map(("v.", "t.")), lambda: (ours(qv, normalize(basis_raw, dim=-1)),
                                                              ours(qt, normalize(basis_raw, dim=-1))),
                        lambda: (theirs["v"](qv, normalize(basis_raw, dim=-1), "visual", None, 0)[0],
                                 theirs["t"](qt, normalize(basis_raw, dim=-1), "textual", labels, 0)[0]), F64,
                        copy=False, departure=True,
                        note="one set of running statistics, updated by both modalities' queries, against CVSE's "
                             "one per modality (share_query: false has CVSE's)"))

    # the branch as CODER uses it with query_source instance: GCN basis, then each modality's module
    torch.manual_seed(10)
    branch = ConceptBranch(ConceptGCN(glove, normalized_adjacency(counts, cooc), dim // 2, dim),
                           ConceptQuery(dim, 10.0, "cvse", "cvse"), ConceptQuery(dim, 10.0, "cvse", "cvse"),
                           query_source="instance")
    theirs = nn.ModuleDict({"gcn": theirs_gcn, "v": consensus().float(), "t": consensus().float()})
    branch_map = (prefixed(GCN_MAP, "gcn.", "gcn.") + prefixed(consensus_map(), "image_query.", "v.")
                  + prefixed(consensus_map(), "text_query.", "t."))
    va, vb = _leaf_pair(normalize(qv, dim=-1).float())
    ta, tb = _leaf_pair(normalize(qt, dim=-1).float())

    def peer_branch():
        basis_v = theirs["gcn"](None, glove[None])  # CVSE runs its GCN once per modality
        basis_t = theirs["gcn"](None, glove[None])
        return (theirs["v"](vb, basis_v, "visual", None, 0)[0],
                theirs["t"](tb, basis_t, "textual", labels.float(), 0)[0])

    def our_branch():
        basis = branch.gcn()
        return branch.encode_image(None, None, basis, v_i=va), branch.encode_text(None, None, basis, w_i=ta)
    rows.append(compare("concept branch (encoder cvse, score cvse, query_source instance) vs C_GCN + V_/T_ "
                        "consensus modules", label, branch, theirs, branch_map, our_branch, peer_branch, F32,
                        inputs=((va, vb), (ta, tb)), unmapped_peer=tuple("gcn." + n for n in gcn_unmapped),
                        note="float32"))
    return rows


# ------------------------------------------------------------------------------------------------ BiGRU
def bigru_text_map(layers: int = 1) -> list[Link]:
    """Our TextEncoder with the BiGRU backbone (model.text_backbone: bigru; merge mean and bigru.hidden =
    embed_dim, so the head has no Linear) <- the `bigru` branch's EncoderText (lib/encoders.py): the word
    embedding `embed`, the bidirectional GRU `rnn` (its width is the branch's embed_size), GPO `gpool`."""
    return ([link("backbone.embed.weight", "embed.weight")]
            + [link(f"backbone.gru.{kind}_{w}_l{k}{rev}", f"rnn.{kind}_{w}_l{k}{rev}") for k in range(layers)
               for kind in ("weight", "bias") for w in ("ih", "hh") for rev in ("", "_reverse")]
            + prefixed(GPO_MAP, "head.aggregate.", "gpool."))


def bigru_backbone_map(layers: int = 1) -> list[Link]:
    """Our BiGRUBackbone alone <- the same EncoderText, whose GPO (`gpool.*`) is then unmapped."""
    return [Link(m.ours.removeprefix("backbone."), m.peers) for m in bigru_text_map(layers)
            if m.ours.startswith("backbone.")]


BIGRU_GPO = tuple("gpool." + p for m in GPO_MAP for p in m.peers)


def bigru_model_config(embed: int = 12, word_dim: int = 8, layers: int = 1, region_dim: int = 16) -> dict:
    """The `model` config of configs/baselines/f30k_vse_bigru.yaml (the branch's recipe) at a small size: the
    GRU as wide as the embedding, as the branch's EncoderText has it."""
    from coder.config import load_config
    return load_config(ROOT / "configs" / "baselines" / "f30k_vse_bigru.yaml", [
        f"model.region_dim={region_dim}", f"model.embed_dim={embed}", f"model.bigru.hidden={embed}",
        f"model.bigru.word_dim={word_dim}", f"model.bigru.layers={layers}"])


def _small_vocabulary(words: int = 25):
    from coder.vocab import SPECIALS, WordVocabulary
    return WordVocabulary([*SPECIALS, *(f"w{i}" for i in range(words))])


def bigru_rows(peer: Peer, path: Path) -> list[Row]:
    """Our BiGRU text encoder, built from the branch's recipe config by the model builders, against the `bigru`
    branch's EncoderText; then that branch's optimizer and schedule (its train.py main()) against our config's.
    The branch's lib/loss.py and lib/modules/ (GPO, MLP) are master's byte for byte and its EncoderImageAggr
    differs by a comment, so the image head, GPO and triplet rows of master stand for it."""
    from coder.models.bigru import build_bigru
    from coder.models.model import build_text_encoder

    P = import_peer(path, ["lib.encoders", "lib.vse"])
    label = peer.label
    rows = []
    gen = torch.Generator().manual_seed(30)
    vocab = _small_vocabulary()
    embed, word_dim = 12, 8

    def pair(layers: int, seed: int):
        """Ours through build_bigru and build_text_encoder, the peer's EncoderText: float64 but GPO (float32 on
        both sides, as in every GPO row)."""
        cfg = bigru_model_config(embed, word_dim, layers)["model"]
        torch.manual_seed(seed)
        ours = build_text_encoder(cfg, build_bigru(cfg, vocab)).double()
        theirs = P.encoders.EncoderText(len(vocab), embed, word_dim, layers).double()
        ours.head.aggregate.float(), theirs.gpool.float()
        return ours.train(), theirs.train()

    def captions(lengths: list[int], width: int):
        lens = torch.tensor(lengths)
        ids = torch.randint(1, len(vocab), (len(lengths), width), generator=gen)
        return ids * (torch.arange(width)[None] < lens[:, None]), lens

    # the peer packs with enforce_sorted: its collate_fn sorts every batch by caption length, longest first
    ids, lens = captions([9, 7, 6, 5, 3, 2], 9)
    ours, theirs = pair(1, 31)
    seen = {}
    hook = theirs.gpool.register_forward_pre_hook(lambda module, args: seen.update(states=args[0]))
    rows.append(compare("BiGRU token states (word embedding + bidirectional GRU, the directions averaged)", label,
                        ours.backbone, theirs, bigru_backbone_map(1), lambda: ours.backbone(ids, lens),
                        lambda: (theirs(ids, lens.double()), seen["states"])[1], F64, unmapped_peer=BIGRU_GPO,
                        note="float64; the states GPO receives (the peer's read by a hook on its gpool)"))
    hook.remove()
    rows.append(compare("EncoderText (BiGRU + GPO + l2 norm), batch in length order", label, ours, theirs,
                        bigru_text_map(1), lambda: ours(ids, lens)[0], lambda: theirs(ids, lens.double()), F32,
                        note="the order the peer's collate gives; float32 GPO"))

    # any order: ours reads the batch as it comes; the peer gets it in its collate's order, put back after
    ids, lens = captions([5, 9, 2, 7, 3, 6], 11)
    order = torch.sort(lens, descending=True, stable=True).indices
    restore = torch.argsort(order)
    rows.append(compare("EncoderText (BiGRU + GPO + l2 norm), batch in any order, padded past the longest", label,
                        ours, theirs, bigru_text_map(1), lambda: ours(ids, lens)[0],
                        lambda: theirs(ids[order, :int(lens.max())], lens[order].double())[restore], F32,
                        note="ours on the batch as given (2 extra pad columns); the peer on it sorted, rows put "
                             "back"))

    ours, theirs = pair(2, 32)
    ids, lens = captions([8, 8, 6, 4, 3, 2], 8)
    rows.append(compare("EncoderText, 2 GRU layers (model.bigru.layers: 2; the branch's --num_layers 2)", label,
                        ours, theirs, bigru_text_map(2), lambda: ours(ids, lens)[0],
                        lambda: theirs(ids, lens.double()), F32, note="float32 GPO"))

    rows.append(bigru_init_row(P, label, vocab, embed, word_dim))
    rows += bigru_schedule_rows(path, label, vocab)
    return rows


def bigru_init_row(P, label: str, vocab, embed: int, word_dim: int) -> Row:
    """The initial weights from one seed: the same distributions on both sides (embedding uniform +-0.1, the
    GRUs and GPO's score PyTorch's defaults), drawn in another order, so not the same numbers."""
    from coder.models.bigru import build_bigru
    from coder.models.model import build_text_encoder
    cfg = bigru_model_config(embed, word_dim)["model"]
    torch.manual_seed(33)
    ours = build_text_encoder(cfg, build_bigru(cfg, vocab))
    torch.manual_seed(33)
    theirs = P.encoders.EncoderText(len(vocab), embed, word_dim, 1)
    mine, peers = _tensors(ours), _tensors(theirs)
    diff = max(max_abs(mine[m.ours], peers[m.peers[0]]) for m in bigru_text_map(1))
    return Row("EncoderText (BiGRU) initial weights from one seed", label, diff, 0.0, 1e-6, departure=True,
               note="the same distributions (embedding uniform +-0.1, GRUs and GPO's score PyTorch's defaults) drawn "
                    "in another order: the peer builds GPO before its GRU and redraws the embedding last")


def bigru_schedule_rows(path: Path, label: str, vocab) -> list[Row]:
    """configs/baselines/f30k_vse_bigru.yaml's optimizer and loss switch against the `bigru` branch's train.py
    main() with its train_region.sh's arguments: on that branch VSEModel optimizes every parameter with one
    AdamW at the base rate and PyTorch's default weight decay (master: BERT at 0.1x, weight decay 1e-4)."""
    from coder.engine import build_optimizer
    from coder.models.bigru import build_bigru
    from coder.models.model import build_itr_model

    cfg = bigru_model_config(12, 8)
    model = build_itr_model(cfg["model"], build_bigru(cfg["model"], vocab))
    optimizer = build_optimizer(model, cfg["train"], model.text_encoder.backbone)
    T = import_peer(path, ["train"]).train
    with tempfile.TemporaryDirectory() as tmp:
        # the vocabulary file the branch's train.py reads (SCAN's layout: <pad> <start> <end> <unk>, the words;
        # train.py appends <mask>), as many entries as ours
        words = [w for w in vocab.words if w != "<mask>"]
        with open(os.path.join(tmp, "f30k_precomp_vocab.json"), "w") as f:
            json.dump({"word2idx": {w: i for i, w in enumerate(words)},
                       "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": len(words)}, f)
        seen = _peer_epochs(T, tmp, [], ["--vocab_path", tmp, "--embed_size", "12", "--img_dim", "16",
                                         "--word_dim", "8"])
    names = {m.ours: m.peers[0] for m in prefixed(IMAGE_HEAD_MAP, "image_encoder.head.", "img_enc.")
             + prefixed(bigru_text_map(1), "text_encoder.", "txt_enc.")}
    return schedule_rows(label, cfg, model, optimizer, seen, names, "one rate for all, BiGRU recipe",
                         tuple("img_enc." + n for n in IMAGE_HEAD_UNUSED))


# ------------------------------------------------------------------------------------------------ registry
PEERS = [
    Peer("vse_infty", "CODER_PEER_VSE_INFTY", "woodfrog/vse_infty", "lib/encoders.py", vse_rows),
    # the BiGRU text encoder: lib/vocab.py is on the bigru branch only (master's text encoder is BERT)
    Peer("vse_infty_bigru", "CODER_PEER_VSE_INFTY_BIGRU", "woodfrog/vse_infty", "lib/vocab.py", bigru_rows,
         branch="bigru"),
    Peer("user", "CODER_PEER_USER", "zhangy0822/USER", "lib/loss.py", user_rows),
    Peer("cvse", "CODER_PEER_CVSE", "BruceW91/CVSE", "model_CVSE.py", cvse_rows),
]


def run(peers: list[Peer], only: list[str] | None = None) -> tuple[list[Row], list[str], list[str]]:
    """(rows, skip reasons, errors) of every peer whose checkout is named."""
    rows, skipped, errors = [], [], []
    for peer in peers:
        if only and peer.key not in only:
            continue
        value = os.environ.get(peer.env, "")
        if not value:
            skipped.append(f"{peer.key}: skipped, {peer.env} is not set (a path to a checkout of {peer.source})")
            continue
        path = Path(value)
        if not (path / peer.marker).is_file():
            errors.append(f"{peer.key}: {peer.env}={value} is not a checkout of {peer.source} (no {peer.marker})")
            continue
        if peer.rows is None:
            skipped.append(f"{peer.key}: skipped, no counterpart in coder.models yet (the harness has a hook)")
            continue
        peer.commit = peer_commit(path, peer.env)
        try:
            rows += peer.rows(peer, path)
        except CoderError as err:
            errors.append(f"{peer.key}: {err}")
    return rows, skipped, errors


def fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else ("0" if x == 0 else f"{x:.1e}")


def table(rows: list[Row]) -> str:
    lines = ["| module | peer (repository@commit) | max abs diff, outputs | max abs diff, gradients | tolerance | "
             "verdict | note |", "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        verdict = ("departure" if r.departure else "conforms") if r.conforms or r.departure else "DIFFERS"
        lines.append(f"| {r.module} | {r.peer} | {fmt(r.out_diff)} | {fmt(r.grad_diff)} | {fmt(r.tol)} | "
                     f"{verdict} | {r.note} |")
    return "\n".join(lines)


def main(argv=None, peers: list[Peer] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="peer keys to run (default: every peer whose variable is set)")
    parser.add_argument("--markdown", action="store_true",
                        help="standard output is only what docs/conformance.md holds: the table, a blank line and "
                             "the last line; skip reasons and errors go to standard error")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    rows, skipped, errors = run(PEERS if peers is None else peers, args.only)
    aside = sys.stderr if args.markdown else sys.stdout
    for line in skipped:
        print(line, file=aside)
    if rows:
        print(table(rows) + ("\n" if args.markdown else ""))
    for line in errors:
        print(f"error: {line}", file=aside)
    counted = [r for r in rows if not r.departure]
    good = sum(r.conforms for r in counted)
    print(f"{good} of {len(counted)} comparisons conform")
    return 0 if good == len(counted) and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
