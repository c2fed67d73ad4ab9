"""A checkpoint written by an earlier release (format 1, tests/fixtures/v1_checkpoint: a tiny full-CODER run with
the concept branch, momentum banks and PGC) still loads and evaluates to the numbers recorded when it was written."""
import json
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "v1_checkpoint"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
OVERRIDES = [f"data.root={FIXTURE / 'data'}", f"model.text_encoder={FIXTURE / 'text_encoder'}"]


def test_old_checkpoint_encodes_to_its_recorded_embeddings():
    from coder.evaluation import encode_for_split
    from coder.evaluation.loading import load_for_eval

    loaded = load_for_eval(str(FIXTURE / "model_best.pth"), OVERRIDES, torch.device("cpu"))
    emb = encode_for_split(loaded.model, loaded.cfg, loaded.tokenizer, "test", torch.device("cpu"), progress=False)
    assert set(emb) == set(EXPECTED["embeddings"])
    for name, recorded in EXPECTED["embeddings"].items():
        np.testing.assert_allclose(emb[name].double().numpy(), np.array(recorded), atol=1e-5, err_msg=name)


def test_old_checkpoint_evaluates_to_its_recorded_numbers(tmp_path):
    import evaluate

    args = ["--checkpoint", str(FIXTURE / "model_best.pth"), "--output", str(tmp_path), "--device", "cpu",
            "--no-progress"]
    for override in OVERRIDES:
        args += ["--set", override]
    assert evaluate.main(args) == 0
    result = json.loads((tmp_path / "eval_test.json").read_text())
    for key, recorded in EXPECTED["eval_test"].items():
        assert result[key] == recorded, key
