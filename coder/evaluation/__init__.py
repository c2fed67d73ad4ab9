"""Retrieval evaluation (CODER §3.5, §4.1), one module per job, in the order data flows:

- `ranking`: the fused score S = beta S^I + (1 - beta) S^C, the one tie rule, R@K / medr / meanr / R@sum;
- `encode`: a split's datasets and their embeddings, encoded once;
- `protocols`: Flickr30K 1K, COCO 5-fold 1K and 5K, for one model or an ensemble; `eccv`: ECCV Caption / CxC;
- `compare`: the paired bootstrap of `evaluate.py --compare`;
- `splits`: a split end to end (encode, protocol), as train.py and evaluate.py run it;
- `tables`: the printed Table-1 rows and the JSON record; `loading`: the one checkpoint loader.

The names below import from `coder.evaluation` as they always did.
"""
from ..errors import EvaluationError, NonFiniteScoresError
from .compare import COMPARED, check_resamples, compare_members, hit_differences, paired_bootstrap
from .encode import encode_datasets, encode_for_split, encode_split, split_datasets
from .protocols import (
    Member,
    block_ranks,
    block_recalls,
    ensemble_chunks,
    evaluate_embeddings,
    evaluate_members,
    member,
    on_device,
    protocol_fold5,
    protocol_ranks,
    rank_block,
)
from .ranking import (
    RECALL_KS,
    average_recalls,
    chance_rsum,
    check_finite,
    compute_recalls,
    duplicate_captions,
    fuse,
    fused_chunks,
    fused_positives,
    pessimistic_rank,
    ranks_from_chunks,
    recalls_from_ranks,
    tie_rank,
)
from .splits import evaluate_model, evaluate_split
from .tables import TABLE_HEADER, format_comparison, format_eccv, format_row, format_table, write_json

__all__ = [
    "COMPARED", "RECALL_KS", "TABLE_HEADER", "EvaluationError", "Member", "NonFiniteScoresError", "average_recalls",
    "block_ranks", "block_recalls", "chance_rsum", "check_finite", "check_resamples", "compare_members",
    "compute_recalls", "duplicate_captions", "encode_datasets", "encode_for_split", "encode_split",
    "ensemble_chunks", "evaluate_embeddings", "evaluate_members", "evaluate_model", "evaluate_split",
    "format_comparison", "format_eccv", "format_row", "format_table", "fuse", "fused_chunks", "fused_positives",
    "hit_differences", "member", "on_device", "paired_bootstrap", "pessimistic_rank", "protocol_fold5",
    "protocol_ranks", "rank_block", "ranks_from_chunks", "recalls_from_ranks", "split_datasets", "tie_rank",
    "write_json",
]
