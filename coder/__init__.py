"""coder: image-text retrieval with CODER (ECCV 2022) and USER in one PyTorch framework.

The names a user needs most, from one place; each lives in the module named beside it.
"""
from .config import load_config  # coder/config.py
from .engine import Trainer  # coder/engine.py
from .errors import CoderError  # coder/errors.py
from .evaluation import compute_recalls, evaluate_model, evaluate_split  # coder/evaluation/
from .models import build_model  # coder/models/model.py

__version__ = "0.2.0"
__all__ = ["load_config", "Trainer", "CoderError", "compute_recalls", "evaluate_model", "evaluate_split",
           "build_model", "__version__"]
