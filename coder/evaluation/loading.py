"""The one way a checkpoint is loaded for inference: `evaluate.py`, ensembles, `--compare` and the retrieval
report all take (model, config, tokenizer, fusion weight) from `load_for_eval`."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

from ..checkpoint import load_checkpoint, saved_config
from ..config import merge, nest, parse_override, validate
from ..errors import CheckpointError, ConfigError
from ..models.bigru import load_text
from ..models.model import build_model

OVERRIDABLE = ("data", "eval")  # settings of the split and its ranking; the model stays the checkpoint's
PATH_KEYS = ("model.text_encoder", "model.concept.vocab")  # where files are; the weights stay the checkpoint's


class Loaded(NamedTuple):
    path: str
    ckpt: dict
    cfg: dict
    model: object
    tokenizer: object
    beta: float | None  # the fusion weight picked on dev in training, unless --set eval.beta chose one

    @property
    def fusion_beta(self) -> float:
        """beta of S = beta S^I + (1 - beta) S^C (§3.5): training's choice on dev, else `eval.beta`."""
        return self.cfg["eval"]["beta"] if self.beta is None else self.beta


def check_folder(path: Path, what: str) -> None:
    """`path` is a folder or can be made one: neither it nor its nearest existing parent is a file."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "" if part == path else f": {part}"
                raise ConfigError(f"{what} {path}{where} is a file, not a folder")
            return


def eval_config(ckpt: dict, overrides: Sequence[str], who: str = "evaluate.py") -> dict:
    """The checkpoint's config over the current defaults (keys added since it was written take their
    default), with `a.b=v` overrides of data.*, eval.* and the file paths only."""
    cfg = saved_config(ckpt["config"])
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] not in OVERRIDABLE and ".".join(keys) not in PATH_KEYS:
            raise ConfigError(f"{who} only overrides data.* and eval.* keys and the paths "
                              f"{', '.join(PATH_KEYS)}, not '{'.'.join(keys)}'")
        merge(cfg, nest(keys, value))
    validate(cfg)
    return cfg


def inference_model(cfg: dict, bert, state: dict, path: str | Path):
    """The model for inference: every weight must match the checkpoint exactly (the momentum key encoders and
    memory banks of §3.2 serve training only: they are the training step's, stored apart). The concept branch's
    fixed buffers (X, A_hat) come from the checkpoint, so it evaluates without its concepts file."""
    model = build_model(cfg, bert, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # torch's first line only names the model; the next one names the keys
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))[:300]
        raise CheckpointError(f"{path}: its weights do not fit the model its config builds (another "
                              f"concepts file, model.concept.vocab?): {detail}") from err
    return model.eval()


def load_for_eval(path: str | Path, overrides: Sequence[str], device, who: str = "evaluate.py") -> Loaded:
    """A checkpoint ready to encode a split: its config with `overrides` (see `eval_config`; `who` names the
    command in the refusal), the text backbone, the inference model on `device`, and training's beta."""
    path = str(path)
    if Path(path).is_dir():
        raise CheckpointError(f"--checkpoint {path} is a folder; expected a checkpoint file, e.g. "
                              f"{Path(path) / 'model_best.pth'}")
    ckpt = load_checkpoint(path)
    cfg = eval_config(ckpt, overrides, who)
    check_folder(Path(cfg["data"]["root"]), "config key 'data.root'")
    bert, tokenizer = load_text(cfg, ckpt["model"])  # a BiGRU's vocabulary is the checkpoint's
    model = inference_model(cfg, bert, ckpt["model"], path).to(device)
    chosen = any(text.split("=", 1)[0].strip() == "eval.beta" for text in overrides)
    return Loaded(path, ckpt, cfg, model, tokenizer, None if chosen else ckpt.get("beta"))
