"""The evaluation split by job: one fused-score formula and one tie rule shared by the protocols and the
retrieval report (CODER §3.5, §4.1), one checkpoint loader for evaluate.py and the report, encoding fed by
`data.num_workers` DataLoader workers, and an import graph without circles (the concept-vocabulary builder
off the run-time path)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coder.evaluation import fused_chunks, fused_positives, pessimistic_rank, ranks_from_chunks
from coder.report import score_rows
from tests.test_evaluation import _embeddings

REPO = Path(__file__).resolve().parents[1]
CODER = REPO / "coder"
FIXTURE = REPO / "tests" / "fixtures" / "v1_checkpoint"
EVALUATION_FILES = [*sorted((CODER / "evaluation").glob("*.py")), CODER / "report.py", CODER / "concepts.py",
                    CODER / "cli.py", CODER / "stats.py"]


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9, 1.0])
def test_protocols_and_report_score_by_one_formula(beta):
    emb = _embeddings(12)
    direct = beta * emb["v_i"] @ emb["w_i"].t() + (1 - beta) * emb["v_c"] @ emb["w_c"].t()
    chunks = torch.cat([rows for _, rows in fused_chunks(emb, beta, slice(0, 12), slice(0, 60), 5)])
    torch.testing.assert_close(chunks, direct, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused_positives(emb, beta, slice(0, 60), 5), direct[torch.arange(60) // 5,
                                                                                      torch.arange(60)])
    fused, _, _ = score_rows(emb, beta, "i2t", list(range(12)))
    torch.testing.assert_close(fused, direct, rtol=0, atol=1e-6)
    fused_t2i, _, _ = score_rows(emb, beta, "t2i", list(range(60)))
    torch.testing.assert_close(fused_t2i, direct.t(), rtol=0, atol=1e-6)


def test_an_instance_only_model_ranks_by_its_instance_score():
    emb = {k: v for k, v in _embeddings(6, concept=False).items()}
    instance = emb["v_i"] @ emb["w_i"].t()
    for beta in (0.0, 0.5):
        torch.testing.assert_close(next(fused_chunks(emb, beta, slice(0, 6), slice(0, 30), 6))[1], instance)
        torch.testing.assert_close(score_rows(emb, beta, "i2t", range(6))[0], instance)


def test_the_report_ranks_a_query_as_the_protocol_does():
    """Integer scores in three levels: ties everywhere, and both paths count them against the model."""
    sims = torch.as_tensor(np.random.default_rng(4).integers(0, 3, size=(8, 40)), dtype=torch.float32)
    captions = torch.arange(40)
    i2t, t2i = ranks_from_chunks([(0, sims)], sims[captions // 5, captions], 8)
    for image in range(8):
        own = np.zeros(40, dtype=bool)
        own[5 * image:5 * image + 5] = True
        assert pessimistic_rank(sims[image].double().numpy(), own) == i2t[image]
    for caption in range(40):
        own = np.zeros(8, dtype=bool)
        own[caption // 5] = True
        assert pessimistic_rank(sims[:, caption].double().numpy(), own) == t2i[caption]


# ------------------------------------------------------------------------------------------- one loader
def test_the_report_loads_a_checkpoint_as_evaluate_does():
    """The old-format fixture (momentum banks, PGC, concept branch) through the report's loader encodes to the
    embeddings evaluate.py recorded for it."""
    from coder.evaluation import encode_for_split
    from coder.report import load_model

    expected = json.loads((FIXTURE / "expected.json").read_text())["embeddings"]
    model, cfg, tokenizer = load_model(FIXTURE / "model_best.pth", [f"data.root={FIXTURE / 'data'}",
                                                                    f"model.text_encoder={FIXTURE / 'text_encoder'}"])
    assert not any(name.startswith("momentum.") for name in model.state_dict())  # inference only
    emb = encode_for_split(model, cfg, tokenizer, "test", "cpu", progress=False)
    for name, recorded in expected.items():
        np.testing.assert_allclose(emb[name].double().numpy(), np.array(recorded), atol=1e-5, err_msg=name)


def test_weights_that_do_not_fit_are_a_one_line_error(tmp_path, capsys):
    import evaluate

    ckpt = torch.load(FIXTURE / "model_best.pth", map_location="cpu", weights_only=True)
    name = next(k for k in ckpt["model"] if not k.startswith("momentum."))
    del ckpt["model"][name]
    torch.save(ckpt, tmp_path / "broken.pth")
    rc = evaluate.main(["--checkpoint", str(tmp_path / "broken.pth"), "--output", str(tmp_path), "--device", "cpu",
                        "--no-progress", "--set", f"data.root={FIXTURE / 'data'}",
                        "--set", f"model.text_encoder={FIXTURE / 'text_encoder'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "weights do not fit the model its config builds" in err
    assert name in err and str(tmp_path / "broken.pth") in err


# ------------------------------------------------------------------------------------------- workers
def test_data_workers_feed_the_evaluation_with_the_same_result(monkeypatch):
    import coder.evaluation.encode as encode
    from coder.evaluation import encode_for_split, evaluate_split
    from coder.evaluation.loading import load_for_eval

    made = []
    real = encode.DataLoader
    monkeypatch.setattr(encode, "DataLoader", lambda *a, **kw: made.append(kw) or real(*a, **kw))
    sets = [f"data.root={FIXTURE / 'data'}", f"model.text_encoder={FIXTURE / 'text_encoder'}", "eval.batch_size=7"]
    results, embeddings = {}, {}
    for workers in (0, 2):  # evaluate.py's and training's path, then the one of --compare and ensembles
        loaded = load_for_eval(FIXTURE / "model_best.pth", sets + [f"data.num_workers={workers}"], "cpu")
        results[workers] = evaluate_split(loaded.model, loaded.cfg, loaded.tokenizer, "test", "cpu", progress=False,
                                          beta=loaded.beta)
        embeddings[workers] = encode_for_split(loaded.model, loaded.cfg, loaded.tokenizer, "test", "cpu", False)
    assert [kw["num_workers"] for kw in made] == [0] * 4 + [2] * 4  # images, then captions, per encoding
    assert not any(kw["pin_memory"] for kw in made)  # page-locked batches only for CUDA
    for key in ("i2t", "t2i", "rsum", "instance", "concept"):
        assert results[2][key] == results[0][key], key
    for name, value in embeddings[0].items():
        torch.testing.assert_close(embeddings[2][name], value, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- the house
def _imports(path: Path):
    """(module-level, inside a function or class) package-internal ImportFrom nodes of a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    internal = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and (n.level or (n.module or "").split(".")[0] == "coder")]
    return [n for n in internal if id(n) in top], [n for n in internal if id(n) not in top]


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(path: Path, node: ast.ImportFrom, modules: set[str]) -> set[str]:
    package = _module(path) if path.name == "__init__.py" else _module(path).rsplit(".", 1)[0]
    base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
    target = ".".join(base + ([node.module] if node.module else []))
    found = {f"{target}.{a.name}" for a in node.names} & modules or {target}
    out = set()
    for name in found:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        out.add(name)
    return out


def test_the_package_import_graph_has_no_circle():
    paths = {_module(p): p for p in CODER.rglob("*.py")}
    edges = {m: {t for node in _imports(p)[0] for t in _targets(p, node, set(paths))} - {m} for m, p in paths.items()}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            assert state.get(target) != 1, "import circle: " + " -> ".join(trail[trail.index(target):] + [target])
            if target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(paths):
        if module not in state:
            visit(module, [module])


def test_evaluation_files_import_nothing_of_the_package_inside_a_function():
    inner = [f"{p.relative_to(REPO)}:{n.lineno}" for p in EVALUATION_FILES for n in _imports(p)[1]]
    assert not inner


def test_the_concept_builder_is_off_the_run_time_path():
    code = ("import sys, coder, coder.engine, coder.evaluation, coder.evaluation.loading, coder.report; "
            "print(sorted(m for m in sys.modules if m.startswith('coder.tools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_evaluation_errors_are_defined_in_errors_py():
    import coder.errors
    from coder import concepts, evaluation, report
    from coder.evaluation import eccv

    for module, name in ((evaluation, "EvaluationError"), (evaluation, "NonFiniteScoresError"),
                         (eccv, "EccvSplitError"), (report, "ReportError"), (concepts, "ConceptError")):
        assert getattr(module, name) is getattr(coder.errors, name)
        assert getattr(coder.errors, name).__module__ == "coder.errors"
