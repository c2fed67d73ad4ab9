"""Losses, one per file, each a plain function of similarities or embeddings (CODER §3.3-3.4, USER's UTO), and
`Objective`, their weighted sum for a run (Eq. 8)."""
from .dcl import POSITIVE_FORMS, dcl, diversity
from .infonce import infonce
from .objective import Bank, Objective, build_objective, register_instance_loss
from .pgc import PrototypeClassifier, pgc
from .triplet import triplet
from .uto import uto, uto_term

__all__ = ["diversity", "dcl", "POSITIVE_FORMS", "triplet", "infonce", "pgc", "PrototypeClassifier", "uto",
           "uto_term", "Objective", "Bank", "build_objective", "register_instance_loss"]
