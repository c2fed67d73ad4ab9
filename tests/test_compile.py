"""`train.compile` (coder/step.py, `compile_step`): the training step's modules compiled in place give the eager
run's losses, and their checkpoints are the eager run's: a compiled run resumes eager and compiled, an eager one
compiled, each to the numbers of the uninterrupted run.

The runs use dynamo's `eager` backend (the graphs dynamo captures, run without code generation), the mean
aggregator and batches of one shape (no augmentation, captions cut to 8 word-pieces): GPO's packed GRU breaks
the graph (dynamo does not trace `pack_padded_sequence`) and every new batch length is a retrace, about four
times the tracing of the mean heads. One test compiles with inductor, the backend `train.compile: true` selects,
on a tiny step of fixed shapes.
"""
import copy
import shutil

import pytest
import torch

import coder.engine as engine
from coder.config import ConfigError, load_config
from coder.engine import Trainer
from coder.lengths import Lengths
from coder.models.model import build_itr_model
from coder.models.text import tiny_bert
from coder.step import build_step, compile_step

STEPS, STOP = 4, 2  # steps of the epoch; the stopped runs write checkpoint_last.pth after STOP steps


def tiny(root, bert, compile_, *extra):
    """Full CODER of the demo (momentum banks, concept branch) at toy sizes, mean heads (the docstring says why)."""
    return load_config("configs/demo.yaml", [
        f"data.root={root}", f"model.text_encoder={bert}", f"model.concept.vocab={root / 'concepts.npz'}",
        "model.text_layers=1", "model.region_dim=16", "model.embed_dim=16", "model.momentum.queue_size=16",
        "model.concept.gcn_hidden=16", "model.aggregator=mean", "cluster.k=7", "train.batch_size=4",
        "train.epochs=1", f"train.max_steps_per_epoch={STEPS}", "train.device=cpu", "train.log_every=1000",
        "train.save_every=0", "eval.batch_size=20", f"train.compile={compile_}", "data.augment=false",
        "data.max_words=8", *extra])


def run(cfg, out, resume=None, stop=None):
    """(losses of the steps this trainer runs in epoch 0, the trainer); with `stop`, it stops after that many
    steps of the epoch and writes checkpoint_last.pth, as a run killed right after a mid-epoch save."""
    losses, step = [], engine.optimizer_step

    def recorded(loss, *args):
        losses.append(loss.detach().clone())
        return step(loss, *args)
    engine.optimizer_step = recorded
    try:
        trainer = Trainer(cfg, out, resume=resume, progress=False)
        if stop is not None:
            trainer.steps_per_epoch = lambda: stop
        trainer.train_epoch(0)
        if stop is not None:
            trainer.save_last()
    finally:
        engine.optimizer_step = step
    return torch.stack(losses), trainer


def weights(trainer):
    return {**trainer.step.model.state_dict(), **trainer.step.objective.state_dict(),
            **{f"momentum.{k}": v for k, v in trainer.step.momentum.state_dict().items()}}


def assert_same_numbers(losses, trainer, reference_losses, reference):
    """Losses and every weight and buffer (banks included) equal up to float rounding."""
    torch.testing.assert_close(losses, reference_losses, rtol=1e-5, atol=1e-6)
    mine, theirs = weights(trainer), weights(reference)
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def runs(tiny_coder_data, tiny_bert_dir, tmp_path_factory):
    """Uninterrupted eager and compiled runs of STEPS steps, and eager and compiled runs stopped after STOP."""
    tmp = tmp_path_factory.mktemp("compile")
    torch._dynamo.reset()  # this module's first compiled run traces from scratch (its frame count is tested)
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    out = {"eager": run(tiny(tiny_coder_data, tiny_bert_dir, "off"), tmp / "eager")}
    out["compiled"] = run(tiny(tiny_coder_data, tiny_bert_dir, "eager"), tmp / "compiled")
    out["traced_frames"] = torch._dynamo.utils.counters["frames"]["ok"] - frames
    for name, backend in (("stopped_eager", "off"), ("stopped_compiled", "eager")):
        out[name] = run(tiny(tiny_coder_data, tiny_bert_dir, backend), tmp / name, stop=STOP)
    out["cfg"], out["tmp"] = lambda backend: tiny(tiny_coder_data, tiny_bert_dir, backend), tmp
    yield out
    torch._dynamo.reset()  # drop the compiled frames: later tests build modules of their own


def test_compiled_steps_give_the_eager_losses(runs):
    (eager_losses, eager), (losses, compiled) = runs["eager"], runs["compiled"]
    step = compiled.step
    modules = [step.model, step.objective, step.momentum.key_image_encoder, step.momentum.key_text_encoder]
    assert all(m._compiled_call_impl is not None for m in modules)  # compiled in place ...
    assert eager.step._compiled_call_impl is None and eager.model._compiled_call_impl is None
    assert runs["traced_frames"] > 0  # ... and dynamo traced the step's frames
    assert len(losses) == STEPS and bool(torch.isfinite(losses).all())
    assert_same_numbers(losses, compiled, eager_losses, eager)


def test_checkpoints_keep_the_eager_layout(runs):
    """No `_orig_mod.` prefix: a compiled run's checkpoint has the eager run's keys, shapes and dtypes."""
    eager = torch.load(runs["tmp"] / "stopped_eager" / "checkpoint_last.pth", weights_only=True)
    compiled = torch.load(runs["tmp"] / "stopped_compiled" / "checkpoint_last.pth", weights_only=True)
    for part in ("model", "momentum", "objective"):
        assert {k: (v.shape, v.dtype) for k, v in compiled[part].items()} == \
            {k: (v.shape, v.dtype) for k, v in eager[part].items()}
    assert compiled["config"]["train"]["compile"] == "eager" and eager["config"]["train"]["compile"] == "off"


@pytest.mark.parametrize("written, resumed", [("stopped_compiled", "off"), ("stopped_compiled", "eager"),
                                              ("stopped_eager", "eager")])
def test_a_checkpoint_resumes_compiled_or_eager_to_the_uninterrupted_numbers(runs, written, resumed, tmp_path):
    shutil.copytree(runs["tmp"] / written, tmp_path / "run")
    losses, trainer = run(runs["cfg"](resumed), tmp_path / "run", resume="auto")
    assert trainer.global_step == STEPS and len(losses) == STEPS - STOP
    assert (trainer.step.model._compiled_call_impl is not None) == (resumed != "off")
    for reference in ("eager", "compiled"):  # the two uninterrupted runs agree (the first test)
        reference_losses, uninterrupted = runs[reference]
        assert_same_numbers(losses, trainer, reference_losses[STOP:], uninterrupted)


@pytest.mark.parametrize("value", ["fast", "max-autotune", "cudagraphs", 1])
def test_an_invalid_value_is_one_error_naming_the_key(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"train.compile={value}"])
    message = str(err.value)
    assert "'train.compile'" in message and "\n" not in message


def test_yaml_bools_read_as_off_and_inductor():
    assert load_config(None, ["train.compile=true"])["train"]["compile"] == "inductor"
    assert load_config(None, ["train.compile=off"])["train"]["compile"] == "off"  # YAML's off is False
    assert load_config(None)["train"]["compile"] == "off"  # off by default


def cpp_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not cpp_compiler(), reason="inductor on the CPU needs a C++ compiler")
def test_inductor_draws_eager_dropout_and_gives_the_eager_step():
    """`train.compile: inductor` (what `true` selects) on a tiny instance-only step, BERT's dropout on: eager's
    loss, dropout masks included (`fallback_random`; inductor's own generator would draw other masks). The
    forward only, each graph being a C++ build: under a minute on two busy CPU cores with an empty inductor
    cache, most of it inductor's first use."""
    cfg = load_config(None, ["model.region_dim=8", "model.num_regions=4", "model.embed_dim=8",
                             "model.aggregator=mean", "train.compile=true"])
    torch.manual_seed(0)
    model = build_itr_model(cfg["model"], tiny_bert(vocab_size=50, hidden=16, layers=1, heads=2))
    eager = build_step(cfg, model).train()
    compiled = copy.deepcopy(eager)
    assert compile_step(compiled, cfg["train"]["compile"]) == [compiled.model, compiled.objective]
    g = torch.Generator().manual_seed(1)
    text_lengths = torch.tensor([6, 4, 5, 3])
    ids = torch.randint(5, 50, (4, 6), generator=g) * (torch.arange(6) < text_lengths[:, None])
    data = {"regions": torch.randn(4, 4, 8, generator=g), "region_lengths": Lengths(torch.tensor([4, 3, 4, 2])),
            "input_ids": ids, "text_lengths": Lengths(text_lengths), "index": torch.arange(4),
            "image_index": torch.arange(4)}
    losses = []
    try:
        for step in (eager, compiled):
            torch.manual_seed(2)  # the same random stream for both steps' dropout
            with torch.no_grad():
                losses.append(step(data, 0)[0])
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
