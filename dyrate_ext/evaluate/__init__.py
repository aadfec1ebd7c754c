"""Caption quality vs decoder cost of every pruning policy (`python -m dyrate_ext.evaluate`).

    from dyrate_ext.evaluate import cider, bleu4, facts, embedded_set, run_policy, Spec
    data = embedded_set("test", n=200, style="redundant")

Modules: `metrics` (CIDEr, BLEU-4, facts), `runner` (datasets, policy runs, FLOPs), `engines`
(either engine, timed), `specs` (the policy sweep, predictor files, the model),
`paired` (CIDEr vs the FastV curve at equal cost, paired standard errors), `report` (JSON,
markdown table, Pareto plots); the CLI is `__main__`.
"""

from __future__ import annotations

from .metrics import FactScore, bleu4, cider, coco_tokenize, facts
from .runner import EvalSet, Row, Spec, coco_set, embedded_set, prepare, run_policy

__all__ = [
    "EvalSet",
    "FactScore",
    "Row",
    "Spec",
    "bleu4",
    "cider",
    "coco_set",
    "coco_tokenize",
    "embedded_set",
    "facts",
    "prepare",
    "run_policy",
]
