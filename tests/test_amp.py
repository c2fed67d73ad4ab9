"""Mixed precision (train.amp: auto | bf16 | fp16 | off): the encoders may run in half precision, the losses
never do (they sharpen similarities by 1 / (mu div) >= 10 and alpha = 90), and fp16 trains with a gradient
scaler that the checkpoint carries. All on the CPU: its autocast rounds matmuls to bf16/fp16 as CUDA's does."""
import pytest
import torch

from coder.checkpoint import load_checkpoint
from coder.config import load_config
from coder.engine import Trainer, amp_dtype
from coder.losses import Bank
from coder.step import build_objective

B, Q, F, K = 8, 16, 32, 5


def unit(*shape, g):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def loss_and_grads(obj, autocast: bool):
    g = torch.Generator().manual_seed(0)
    out = {name: unit(B, F, g=g).requires_grad_() for name in ("v_i", "w_i", "v_c", "w_c")}
    out.update({name: unit(B, F, g=g) for name in ("v_key", "w_key")})
    bank = Bank(unit(Q, F, g=g), unit(Q, F, g=g), torch.randint(0, 4, (Q,), generator=g),
                torch.randint(0, 4, (Q,), generator=g))
    batch = {"index": torch.arange(B), "image_index": torch.arange(B) // 2}
    labels = torch.randint(0, K, (B,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, terms, _ = obj(out, batch, 1, bank, labels)
    total.backward()
    return total.detach(), {n: t.grad for n, t in out.items() if t.requires_grad}, set(terms)


@pytest.mark.parametrize("overrides, expected", [
    ([], {"instance", "memory", "concept", "pgc"}),  # L_DCL^I, M-DCL, L_DCL^C, L_PGC (Eq. 8)
    (["loss.instance=uto", "loss.instance_weight=20.0", "model.concept.enabled=false"], {"instance", "memory"}),
])
def test_losses_and_gradients_are_float32_under_bf16_autocast(overrides, expected):
    cfg = load_config("configs/f30k_coder.yaml", [f"model.embed_dim={F}", f"cluster.k={K}", *overrides])
    obj = build_objective(cfg)
    reference, ref_grads, terms = loss_and_grads(obj, autocast=False)
    mixed, grads, _ = loss_and_grads(obj, autocast=True)
    assert terms == expected and mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_amp_modes(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cuda) is None
    assert amp_dtype("bf16", cpu) == torch.bfloat16 and amp_dtype("fp16", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100: emulated bf16
    assert amp_dtype("auto", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100
    assert amp_dtype("auto", cuda) == torch.bfloat16


def test_legacy_boolean_amp_still_loads():
    assert load_config(None, ["train.amp=true"])["train"]["amp"] == "auto"
    assert load_config(None, ["train.amp=false"])["train"]["amp"] == "off"
    assert load_config(None, ["train.amp=off"])["train"]["amp"] == "off"  # YAML 1.1 reads a bare off as false


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_half_precision_trains_and_resumes_its_gradient_scaler(mode, tiny_coder_data, tiny_bert_dir, tmp_path):
    root = tiny_coder_data
    cfg = load_config("configs/demo.yaml", [
        f"data.root={root}", f"model.text_encoder={tiny_bert_dir}", "model.text_layers=2", "model.region_dim=16",
        "model.embed_dim=16", f"model.concept.vocab={root / 'concepts.npz'}", "model.momentum.queue_size=16",
        "cluster.k=7", "train.batch_size=8", "train.max_steps_per_epoch=2", "train.epochs=1", "train.device=cpu",
        "eval.batch_size=20", f"train.amp={mode}", "train.log_every=1"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.train_epoch(0)
    trainer.save_last()
    trainer.log.close()
    saved = load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")["scaler"]
    assert trainer.scaler.is_enabled() == (mode == "fp16")
    if mode == "fp16":
        assert saved == trainer.scaler.state_dict() and saved["scale"] <= 65536.0  # fp16 overflows back it off
        resumed = Trainer(cfg, tmp_path / "run", resume="auto", progress=False)
        resumed.log.close()
        assert resumed.scaler.state_dict() == trainer.scaler.state_dict()


@pytest.mark.parametrize("mode, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("off", torch.float32)])
def test_train_amp_reaches_every_encoder_layer_of_the_step(mode, dtype, tiny_coder_data, tiny_bert_dir, tmp_path):
    """What train.amp auto picks on a GPU (bf16 on Ampere and later, fp16 before) is what the training step's
    encoders run in: every linear layer the step runs (BERT, the heads, the concept branch, the momentum
    encoders) computes in that dtype; off: float32."""
    root = tiny_coder_data
    cfg = load_config("configs/demo.yaml", [
        f"data.root={root}", f"model.text_encoder={tiny_bert_dir}", "model.text_layers=2", "model.region_dim=16",
        "model.embed_dim=16", f"model.concept.vocab={root / 'concepts.npz'}", "model.momentum.queue_size=16",
        "cluster.k=7", "train.batch_size=8", "train.max_steps_per_epoch=1", "train.epochs=1", "train.device=cpu",
        "eval.batch_size=20", f"train.amp='{mode}'"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    seen = set()
    linears = [m for m in trainer.step.modules() if isinstance(m, torch.nn.Linear)]
    for module in linears:
        module.register_forward_hook(lambda module, args, output: seen.add(output.dtype))
    trainer.train_epoch(0)
    trainer.log.close()
    assert len(linears) > 10 and seen == {dtype}
