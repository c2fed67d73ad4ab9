"""Resume across devices and precisions: `train.amp: auto` resolves per device (none on the CPU, bf16 on
compute capability 8+, fp16 below), so a checkpoint written under one precision is resumed under another with
the same config. Emulated on the CPU by resolving the resumed run's amp to the other precision."""
import pytest
import torch

import coder.engine as engine
from coder.config import load_config
from coder.engine import Trainer

CASES = {  # written with -> resumed with (what `auto` picks on the resuming device)
    "cpu_to_fp16": ("off", torch.float16),
    "bf16_to_fp16": ("bf16", torch.float16),
    "fp16_to_off": ("fp16", None),
}


def tiny(root, bert, amp):
    return load_config("configs/demo.yaml", [
        f"data.root={root}", f"model.text_encoder={bert}", f"model.concept.vocab={root / 'concepts.npz'}",
        "model.text_layers=1", "model.region_dim=16", "model.embed_dim=16", "model.momentum.queue_size=16",
        "model.concept.gcn_hidden=16", "cluster.k=7", "train.batch_size=8", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.device=cpu", "train.log_every=1000", "train.save_every=0",
        "eval.batch_size=20", f"train.amp='{amp}'"])  # quoted: YAML reads a bare off as false


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_checkpoint_resumes_under_another_precision(case, tiny_coder_data, tiny_bert_dir, tmp_path, monkeypatch):
    written, resumed = CASES[case]
    cfg = tiny(tiny_coder_data, tiny_bert_dir, written)
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.train_epoch(0)
    if trainer.scaler.is_enabled():  # fp16: a loss scale the resumed run must not need
        trainer.scaler.update(1024.0)
    trainer.save_last()
    saved_scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None

    monkeypatch.setattr(engine, "amp_dtype", lambda mode, device: resumed)
    again = Trainer(tiny(tiny_coder_data, tiny_bert_dir, written), tmp_path, resume="auto", progress=False)
    assert (again.step_in_epoch, again.global_step) == (2, 2)
    assert again.scaler.is_enabled() == (resumed == torch.float16)
    if again.scaler.is_enabled():  # nothing to carry over: fp16's initial scale, calibrated while training
        assert saved_scale is None and again.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    for a, b in zip(again.model.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(a, b)
    again.step_in_epoch, again.cfg["train"]["max_steps_per_epoch"] = 0, 1
    again.train_epoch(0)  # a step under the new precision (its NaN check raises on a non-finite loss)
    assert again.global_step == 3


def test_fp16_to_fp16_carries_the_loss_scale(tiny_coder_data, tiny_bert_dir, tmp_path):
    cfg = tiny(tiny_coder_data, tiny_bert_dir, "fp16")
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.scaler.scale(torch.ones(()))  # the scale is created lazily
    trainer.scaler.update(1024.0)
    trainer.save_last()
    again = Trainer(tiny(tiny_coder_data, tiny_bert_dir, "fp16"), tmp_path, resume="auto", progress=False)
    assert again.scaler.get_scale() == 1024.0
