"""benchmarks/conformance.py without the peers' checkouts (CI has none): its mapping, compare and exit-code
machinery against a small fake peer that the tests write, and the skip of a peer whose variable is unset.
Where a peer's checkout is named in the environment, its own rows run too (skipped otherwise)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import conformance as C  # noqa: E402

FAKE = """
import torch
from torch import nn


class PeerLinear(nn.Module):
    '''A peer's y = x W^T + b, stored as 'proj', with a parameter it never uses.'''

    def __init__(self, planted=0.0, drop_bias_grad=False):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.zeros(4))
        self.planted, self.drop_bias_grad = planted, drop_bias_grad

    def forward(self, x):
        bias = self.proj.bias.detach() if self.drop_bias_grad else self.proj.bias
        return x @ self.proj.weight.t() + bias + self.planted


class PeerGCNLayer(nn.Module):
    '''Keeps its matrix (in, out), as CVSE's GraphConvolution does.'''

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 2))

    def forward(self, x):
        return x @ self.weight
"""

MAP = [C.link("weight", "proj.weight"), C.link("bias", "proj.bias")]


@pytest.fixture
def fake(tmp_path):
    """A fake peer checkout: fakepeer_lib/model.py (a name no real peer uses, so nothing is purged)."""
    (tmp_path / "fakepeer_lib").mkdir()
    (tmp_path / "fakepeer_lib" / "__init__.py").write_text("")
    (tmp_path / "fakepeer_lib" / "model.py").write_text(textwrap.dedent(FAKE))
    mod = C.import_peer(tmp_path, ["fakepeer_lib.model"], patch=False).model
    yield tmp_path, mod
    for name in [n for n in sys.modules if n.startswith("fakepeer_lib")]:
        del sys.modules[name]


def _row(mod, **peer_kwargs):
    torch.manual_seed(0)
    ours, theirs = nn.Linear(3, 2).double(), mod.PeerLinear(**peer_kwargs).double()
    a, b = C._leaf_pair(torch.randn(5, 3, dtype=torch.float64))
    return C.compare("linear", "fake@0", ours, theirs, MAP, lambda: ours(a), lambda: theirs(b), 1e-10,
                     inputs=((a, b),), unmapped_peer=("unused",))


def test_equal_peer_conforms_and_weights_are_copied(fake):
    _, mod = fake
    row = _row(mod)
    assert row.conforms and row.out_diff < 1e-12 and row.grad_diff < 1e-12


def test_planted_output_difference_fails(fake):
    row = _row(fake[1], planted=1e-6)
    assert not row.conforms and row.out_diff == pytest.approx(1e-6) and row.grad_diff < 1e-12


def test_missing_gradient_fails(fake):
    row = _row(fake[1], drop_bias_grad=True)  # same outputs; the peer's bias gets no gradient
    assert row.out_diff < 1e-12 and not row.conforms and row.grad_diff == float("inf")


def test_transposed_and_shared_links(fake):
    """One of our matrices as two peer layers that store it transposed: weights copied to both, the two peer
    gradients summed against ours."""
    _, mod = fake
    torch.manual_seed(1)
    ours = nn.Linear(3, 2, bias=False).double()
    theirs = nn.ModuleDict({"a": mod.PeerGCNLayer(), "b": mod.PeerGCNLayer()}).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    mapping = [C.link("weight", ("a.weight", "b.weight"), transpose=True)]
    row = C.compare("shared", "fake@0", ours, theirs, mapping, lambda: (ours(x), ours(y)),
                    lambda: (theirs["a"](x), theirs["b"](y)), 1e-10)
    assert row.conforms, row
    assert torch.equal(theirs["a"].weight, ours.weight.t())


@pytest.mark.parametrize("mapping, unmapped, match", [
    ([C.link("weight", "proj.weight"), C.link("bias", "proj.bias"), C.link("nope", "proj.bias")], ("unused",),
     "our tensor 'nope'"),
    ([C.link("weight", "proj.wrong"), C.link("bias", "proj.bias")], ("unused",), "peer's tensor 'proj.wrong'"),
    ([C.link("weight", "proj.weight", transpose=True), C.link("bias", "proj.bias")], ("unused",), r"shape \(3, 2\)"),
    ([C.link("weight", "proj.weight")], ("unused",), r"our parameters \['bias'\]"),
    (MAP, (), r"peer's parameters \['unused'\]"),
])
def test_mapping_errors_name_the_tensor(fake, mapping, unmapped, match):
    _, mod = fake
    with pytest.raises(C.ConformanceError, match=match):
        C.copy_weights(nn.Linear(3, 2), mod.PeerLinear(), mapping, unmapped)


def _fake_peer(planted: float) -> C.Peer:
    def rows(peer, path):
        mod = C.import_peer(path, ["fakepeer_lib.model"], patch=False).model
        return [_row(mod, planted=planted), C.Row("kept on purpose", "fake", 1.0, 1.0, 0.0, departure=True)]
    return C.Peer("fake", "CODER_PEER_FAKE", "someone/fake", "fakepeer_lib/model.py", rows)


def test_main_exit_codes_and_last_line(fake, monkeypatch, capsys):
    path, _ = fake
    monkeypatch.setenv("CODER_PEER_FAKE", str(path))
    assert C.main([], peers=[_fake_peer(0.0)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "1 of 1 comparisons conform"  # the departure row is shown, not counted
    assert "| linear | fake@0 |" in out and "| departure |" in out
    assert C.main([], peers=[_fake_peer(1e-3)]) == 1
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "0 of 1 comparisons conform" and "DIFFERS" in out


def test_markdown_output_is_the_table_and_the_last_line_only(fake, monkeypatch, capsys):
    path, _ = fake
    monkeypatch.setenv("CODER_PEER_FAKE", str(path))
    monkeypatch.delenv("CODER_PEER_OTHER", raising=False)
    other = C.Peer("other", "CODER_PEER_OTHER", "someone/other", "x.py", None)
    assert C.main(["--markdown"], peers=[_fake_peer(0.0), other]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0].startswith("| module |") and lines[-2] == "" and lines[-1] == "1 of 1 comparisons conform"
    assert "skipped" not in out and "other: skipped, CODER_PEER_OTHER is not set" in err


def test_unset_variable_skips_with_reason_and_bad_path_fails(fake, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("CODER_PEER_FAKE", raising=False)
    assert C.main([], peers=[_fake_peer(1e-3)]) == 0
    out = capsys.readouterr().out
    assert "fake: skipped, CODER_PEER_FAKE is not set (a path to a checkout of someone/fake)" in out
    assert out.strip().splitlines()[-1] == "0 of 0 comparisons conform"
    monkeypatch.setenv("CODER_PEER_FAKE", str(tmp_path / "nowhere"))
    assert C.main([], peers=[_fake_peer(0.0)]) == 1
    assert "is not a checkout of someone/fake (no fakepeer_lib/model.py)" in capsys.readouterr().out


def test_peer_commit_of_a_checkout_an_export_and_a_folder_inside_another_repository(tmp_path, monkeypatch):
    """A git checkout names its HEAD; a source tree without .git (a `git archive` export) the commit its
    `<env>_COMMIT` variable gives, else 'unknown'; a folder inside another repository's work tree is not taken
    for that repository's commit."""
    monkeypatch.delenv("CODER_PEER_FAKE_COMMIT", raising=False)
    repo = tmp_path / "checkout"
    (repo / "sub").mkdir(parents=True)
    (repo / "sub" / "f.py").write_text("")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert C.peer_commit(repo, "CODER_PEER_FAKE") == head[:12]
    export = tmp_path / "export"
    export.mkdir()
    assert C.peer_commit(export, "CODER_PEER_FAKE") == "unknown (not a git checkout; set CODER_PEER_FAKE_COMMIT)"
    assert C.peer_commit(repo / "sub", "CODER_PEER_FAKE").startswith("unknown (not a git checkout")
    monkeypatch.setenv("CODER_PEER_FAKE_COMMIT", "8600f891e143bda1a33d2228999d0d4c63acd4fd")
    assert C.peer_commit(export, "CODER_PEER_FAKE") == "8600f891e143"
    assert C.peer_commit(repo, "CODER_PEER_FAKE") == head[:12]  # git's answer wins where there is one


def test_script_without_checkouts_skips_every_peer():
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODER_PEER_")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conformance.py")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len([line for line in lines if "skipped" in line]) == len(C.PEERS)
    assert lines[-1] == "0 of 0 comparisons conform"


@pytest.mark.parametrize("peer", [p for p in C.PEERS if p.rows is not None], ids=lambda p: p.key)
def test_real_peer_conforms(peer, capsys):
    """Runs only where the peer's checkout is named (never in CI)."""
    if not os.environ.get(peer.env):
        pytest.skip(f"{peer.env} is not set")
    assert C.main(["--only", peer.key]) == 0, capsys.readouterr().out


class _BranchLayout(nn.Module):
    """The parameter layout of the vse_infty `bigru` branch's EncoderText (lib/encoders.py), as its constructor
    lays it out: `embed` (vocabulary x word_dim), a bidirectional GRU `rnn` of width embed_size, and GPO(32, 32)
    `gpool` (a bidirectional GRU over the position encodings and a bias-free `linear` score). Layout only: the
    rows that run the branch's own code are test_real_peer_conforms and the test below."""

    def __init__(self, vocab: int, embed: int, word_dim: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, word_dim)
        self.gpool = nn.Module()
        self.gpool.gru = nn.GRU(32, 32, 1, batch_first=True, bidirectional=True)
        self.gpool.linear = nn.Linear(32, 1, bias=False)
        self.rnn = nn.GRU(word_dim, embed, layers, batch_first=True, bidirectional=True)


@pytest.mark.parametrize("layers", [1, 2])
def test_bigru_mapping_covers_both_sides_without_the_peer(layers):
    """Our BiGRU text encoder, built from configs/baselines/f30k_vse_bigru.yaml at a small size, maps onto the
    branch's layout tensor for tensor (names and shapes both ways), and so does the backbone alone with the
    branch's GPO left unmapped."""
    from coder.models.bigru import build_bigru
    from coder.models.model import build_text_encoder
    vocab = C._small_vocabulary()
    cfg = C.bigru_model_config(embed=12, word_dim=8, layers=layers)["model"]
    ours = build_text_encoder(cfg, build_bigru(cfg, vocab))
    assert isinstance(ours.head.fc, nn.Identity)  # hidden = embed_dim, merge mean: no projection, as the branch
    theirs = _BranchLayout(len(vocab), 12, 8, layers)
    C.copy_weights(ours, theirs, C.bigru_text_map(layers))
    assert torch.equal(theirs.rnn.weight_hh_l0_reverse, ours.backbone.gru.weight_hh_l0_reverse)
    assert torch.equal(theirs.gpool.linear.weight, ours.head.aggregate.score.weight)
    C.copy_weights(ours.backbone, theirs, C.bigru_backbone_map(layers), C.BIGRU_GPO)


def test_bigru_mapping_refuses_what_the_branch_cannot_hold():
    """A GRU narrower than the embedding (our head projects) or the directions concatenated: the branch's
    EncoderText has neither, and the mapping says which tensor has no counterpart or which shape differs."""
    from coder.models.bigru import build_bigru
    from coder.models.model import build_text_encoder
    vocab = C._small_vocabulary()
    cfg = C.bigru_model_config(embed=12, word_dim=8)["model"]
    projected = {**cfg, "bigru": {**cfg["bigru"], "hidden": 10}}
    with pytest.raises(C.ConformanceError, match="shape"):
        C.copy_weights(build_text_encoder(projected, build_bigru(projected, vocab)),
                       _BranchLayout(len(vocab), 12, 8, 1), C.bigru_text_map(1))
    concat = {**cfg, "bigru": {**cfg["bigru"], "merge": "concat"}}
    with pytest.raises(C.ConformanceError, match=r"our parameters \['head.fc.weight', 'head.fc.bias'\]"):
        C.copy_weights(build_text_encoder(concat, build_bigru(concat, vocab)), _BranchLayout(len(vocab), 12, 8, 1),
                       C.bigru_text_map(1))


def test_bigru_peer_is_the_branch_and_refuses_a_master_checkout(tmp_path, monkeypatch, capsys):
    """The BiGRU rows need the bigru branch (its lib/vocab.py; master's text encoder is BERT): a master
    checkout named in CODER_PEER_VSE_INFTY_BIGRU is an error that says so; unset, the peer is skipped."""
    peer = next(p for p in C.PEERS if p.key == "vse_infty_bigru")
    assert peer.rows is C.bigru_rows and peer.branch == "bigru"
    monkeypatch.delenv(peer.env, raising=False)
    assert C.main(["--only", peer.key]) == 0
    assert ("vse_infty_bigru: skipped, CODER_PEER_VSE_INFTY_BIGRU is not set (a path to a checkout of "
            "woodfrog/vse_infty (bigru branch))") in capsys.readouterr().out
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "encoders.py").write_text("")
    monkeypatch.setenv(peer.env, str(tmp_path))
    assert C.main(["--only", peer.key]) == 1
    assert "is not a checkout of woodfrog/vse_infty (bigru branch) (no lib/vocab.py)" in capsys.readouterr().out
    peer.commit = "8600f891e143"
    assert peer.label == "woodfrog/vse_infty@8600f891e143 (bigru)"


def test_bigru_rows_catch_a_planted_direction_weighting(monkeypatch):
    """Where the branch's checkout is named: our BiGRU with its directions weighted 0.6 / 0.4 instead of
    averaged differs from the branch in the states, the pooled embedding and the gradients."""
    peer = next(p for p in C.PEERS if p.key == "vse_infty_bigru")
    if not os.environ.get(peer.env):
        pytest.skip(f"{peer.env} is not set")
    from coder.models import bigru
    forward = bigru.BiGRUBackbone.forward

    def planted(self, input_ids, lengths):
        self.merge = "concat"
        try:
            out = forward(self, input_ids, lengths)
        finally:
            self.merge = "mean"
        half = out.size(-1) // 2
        return 0.6 * out[..., :half] + 0.4 * out[..., half:]
    monkeypatch.setattr(bigru.BiGRUBackbone, "forward", planted)
    rows = [r for r in C.bigru_rows(peer, Path(os.environ[peer.env])) if "BiGRU token states" in r.module
            or r.module.startswith("EncoderText, 2") or "EncoderText (BiGRU + GPO" in r.module]
    assert len(rows) == 4
    assert all(not r.conforms and r.out_diff > 1e-2 and r.grad_diff > 1e-2 for r in rows), rows


def test_training_comparison_reads_curves_and_draws_them(tmp_path):
    """benchmarks/conformance_training.py's bookkeeping (the runs themselves take minutes): dev R@sum per epoch
    from our train.log, mean and spread per epoch over seeds, and the SVG of both sides' curves."""
    import conformance_training as CT
    run = tmp_path / "ours_seed0"
    run.mkdir()
    (run / "train.log").write_text(
        "epoch 0 (of 2) | loss 1.0 | dev R@sum 237.4 | best 237.4 (epoch 0) | 1.0 s, 1.0 s elapsed\n"
        "epoch 1 (of 2) | loss 0.4 | dev R@sum 301.0 | best 301.0 (epoch 1) | 1.0 s, 3.0 s elapsed\n")
    assert CT._dev_rsums(run) == [237.4, 301.0]
    mean_sd = CT.summary({0: [1.0, 4.0], 1: [3.0, 8.0]})
    assert mean_sd[0] == (2.0, pytest.approx(2 ** 0.5)) and mean_sd[1][0] == 6.0
    svg = tmp_path / "curves.svg"
    CT.svg({"ours": {"0": [1.0, 4.0], "1": [3.0, 8.0]}, "peer": {"0": [2.0, 5.0]}}, svg)
    text = svg.read_text()
    assert text.startswith("<svg") and text.count("<polyline") == 5  # three seeds' curves and two means
