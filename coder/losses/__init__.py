"""Losses, one per file, each a plain function of similarities or embeddings (CODER §3.3-3.4, USER's UTO), and the
registry of the instance losses a config can name (registry.py). Their weighted sum, Eq. 8, is coder/step.py's."""
from .dcl import POSITIVE_FORMS, dcl, diversity
from .infonce import infonce
from .pgc import PrototypeClassifier, pgc
from .registry import INSTANCE_LOSSES, Bank, LossInputs, register_instance_loss
from .triplet import triplet
from .uto import uto, uto_term

__all__ = ["diversity", "dcl", "POSITIVE_FORMS", "triplet", "infonce", "pgc", "PrototypeClassifier", "uto",
           "uto_term", "Bank", "LossInputs", "INSTANCE_LOSSES", "register_instance_loss"]
