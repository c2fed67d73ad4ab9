"""train.grad_clip_scope: with `branch` the concept terms' gradients do not change how the instance branch clips."""
import pytest
import torch

from coder.config import load_config
from coder.engine import Trainer, clip_groups


def tiny_coder(root, bert_dir, *overrides):
    return load_config("configs/demo.yaml", [
        f"data.root={root}", f"model.text_encoder={bert_dir}", "model.text_layers=2", "model.region_dim=16",
        "model.embed_dim=16", f"model.concept.vocab={root / 'concepts.npz'}", "model.momentum.queue_size=16",
        "cluster.k=7", "train.batch_size=8", "train.max_steps_per_epoch=2", "train.epochs=1",
        "train.device=cpu", "train.deterministic=true", "eval.batch_size=20", *overrides])


def test_branch_groups_split_the_concept_branch_and_the_pgc_classifier_from_the_rest(tiny_coder_data,
                                                                                     tiny_bert_dir, tmp_path):
    trainer = Trainer(tiny_coder(tiny_coder_data, tiny_bert_dir), tmp_path, progress=False)
    trainer.log.close()
    trainable = {id(p) for p in trainer.step_module.parameters() if p.requires_grad}
    concept = {id(p) for p in [*trainer.model.concept.parameters(), *trainer.objective.prototypes.parameters()]
               if p.requires_grad}
    groups = clip_groups(trainer.model, trainer.objective, "branch")
    assert {id(p) for p in groups["concept"]} == concept
    assert {id(p) for p in groups["instance"]} == trainable - concept
    assert [id(p) for p in clip_groups(trainer.model, trainer.objective, "all")["all"]] == \
        [id(p) for p in trainer.step_module.parameters() if p.requires_grad]


@pytest.mark.parametrize("scope", ["branch", "all"])
def test_instance_branch_steps_ignore_the_concept_loss_only_when_clipped_apart(tiny_coder_data, tiny_bert_dir,
                                                                              tmp_path, scope):
    """Two steps with L_DCL^C on and off (queries detached, so it sends no gradient to the instance branch),
    clipping hard (max norm 0.01): per branch the instance parameters end up the same; under one global
    norm the concept gradients change the factor on the instance gradients, and they differ."""
    trained = {}
    for weight in (1.0, 0.0):
        cfg = tiny_coder(tiny_coder_data, tiny_bert_dir, f"train.grad_clip_scope={scope}", "train.grad_clip=0.01",
                         f"loss.concept_weight={weight}")
        trainer = Trainer(cfg, tmp_path / f"{scope}_{weight}", progress=False)
        trainer.train_epoch(0)  # PGC starts at epoch 1: L_DCL^C is the only concept term here
        trainer.log.close()
        trained[weight] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                           if not n.startswith("concept.") and not n.startswith("momentum.")}
    same = all(torch.allclose(trained[1.0][n], trained[0.0][n], rtol=0, atol=1e-7) for n in trained[0.0])
    assert same == (scope == "branch")


def test_undetached_queries_clip_with_one_norm(tiny_coder_data, tiny_bert_dir, tmp_path):
    """Not detached, L_DCL^C and L_PGC send gradients into the encoders the instance group holds."""
    cfg = tiny_coder(tiny_coder_data, tiny_bert_dir, "model.concept.detach_query=false")
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.log.close()
    assert list(clip_groups(trainer.model, trainer.objective, "branch")) == ["all"]


def one_clipped_step(scaler, clip: float):
    """One SGD step of a tiny linear layer through the engine's optimizer_step: (norms, parameters after)."""
    from coder.engine import optimizer_step

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.randn(5, 4)).pow(2).sum()
    norms = optimizer_step(loss, optimizer, scaler, {"all": list(net.parameters())}, clip)
    return norms, [p.detach().clone() for p in net.parameters()]


def test_clipping_under_the_fp16_loss_scaler_sees_the_true_gradients():
    """Under fp16 (a GPU-only path: train.amp auto picks it on pre-Ampere GPUs) the loss is scaled by 2**16
    before backward; the gradients are unscaled before the clip, so the clip sees, reports and steps with
    the same gradients as without a scaler. Here on the CPU, whose GradScaler scales the same way."""
    plain_norms, plain = one_clipped_step(torch.amp.GradScaler("cpu", enabled=False), clip=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    norms, scaled = one_clipped_step(scaler, clip=0.5)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16  # finite gradients: no step skipped
    assert float(plain_norms["all"]) > 0.5  # the clip is active
    torch.testing.assert_close(norms["all"], plain_norms["all"])
    for after, reference in zip(scaled, plain):
        torch.testing.assert_close(after, reference)


def test_grad_clip_zero_turns_clipping_off():
    """train.grad_clip: 0 means no clipping (not a clip to norm 0, which would zero every gradient): the step
    is plain SGD's p - lr * grad."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    net(torch.randn(5, 4)).pow(2).sum().backward()
    expected = [(p - 0.1 * p.grad).detach() for p in net.parameters()]
    norms, after = one_clipped_step(torch.amp.GradScaler("cpu", enabled=False), clip=0.0)
    assert norms == {}
    for got, want in zip(after, expected):
        torch.testing.assert_close(got, want)
