"""scripts/fit_gap.py: R@sum of a checkpoint on blocks of the training split against a slow re-derivation from
the fused similarity, the unseen split ranked whole, and a one-line error when the blocks exceed the split."""
import sys
from pathlib import Path

import numpy as np
import torch

from coder.evaluation.encode import encode_for_split
from coder.evaluation.loading import load_for_eval
from tests.test_show_retrievals import make_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fit_gap  # noqa: E402


def slow_rsum(emb: dict, beta: float, first: int, n: int, per: int = 5) -> float:
    """R@1/5/10 both ways of images [first, first + n) against their own captions, from the float64 fused
    similarity S = beta S^I + (1 - beta) S^C (§3.5) by sorting, one query at a time."""
    v, w = emb["v_i"][first:first + n].double(), emb["w_i"][first * per:(first + n) * per].double()
    sims = beta * v @ w.T
    if "v_c" in emb:
        sims += (1 - beta) * emb["v_c"][first:first + n].double() @ emb["w_c"][first * per:(first + n) * per].double().T
    sims = sims.numpy()
    i2t = [min(list(np.argsort(-row)).index(j) for j in range(i * per, (i + 1) * per)) for i, row in enumerate(sims)]
    t2i = [list(np.argsort(-col)).index(c // per) for c, col in enumerate(sims.T)]
    return sum(100.0 * np.mean(np.array(ranks) < k) for ranks in (i2t, t2i) for k in (1, 5, 10))


def test_blocks_rank_their_own_images_and_captions(tiny_coder_data, tiny_bert_dir, tmp_path, capsys):
    path = make_checkpoint(tmp_path / "coder.pth", tiny_coder_data, tiny_bert_dir, True)
    result = fit_gap.fit_gap(str(path), blocks=2, block_size=8, split="dev")
    loaded = load_for_eval(path, [], torch.device("cpu"))
    train = encode_for_split(loaded.model, loaded.cfg, loaded.tokenizer, "train", torch.device("cpu"), progress=False)
    dev = encode_for_split(loaded.model, loaded.cfg, loaded.tokenizer, "dev", torch.device("cpu"), progress=False)
    assert loaded.fusion_beta == 0.7  # the checkpoint's eval.beta: the concept branch counts in the ranking
    assert result["train"] == [slow_rsum(train, 0.7, 0, 8), slow_rsum(train, 0.7, 8, 8)]
    assert result["split"] == slow_rsum(dev, 0.7, 0, 4)
    assert fit_gap.main([str(path), "--blocks", "2", "--block-size", "8"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    mean = sum(result["train"]) / 2
    assert row == (f"| {path} | {mean:.1f} ({result['train'][0]:.1f}, {result['train'][1]:.1f}) | "
                   f"{result['split']:.1f} | {mean - result['split']:+.1f} |")
    assert fit_gap.main([str(path), "--blocks", "3", "--block-size", "8"]) == 2
    assert "--blocks 3 x --block-size 8 exceeds the 16 training images" in capsys.readouterr().err
