"""DyRate's quality targets, checked on evaluation tables (`python -m dyrate_ext.evaluate` JSON).

    from dyrate_ext.evaluate.targets import check_targets, targets_markdown
    checks = check_targets(tables)      # tables: {set name: [row dict, ...]} of one model
    print(targets_markdown({"small": checks}))

For every trained DyRate row (family "DyRate") of a caption set:

    flops      at equal KV-cache FLOPs, CIDEr >= FastV's (at its best k) - one paired SE
    kv_read    at equal decode KV bytes read, CIDEr above FastV's by >= 2 paired SEs
    paper      paper-style FLOPs (reconstruction) <= 40 % with CIDEr >= 97 % of NoPrune's and
               above FastV(k=2 r=0.5)'s and every VTW row's
    dense      (per predictor, across the two styles of one split) more image tokens kept on
               the dense style than on the redundant one

A comparison outside FastV's measured range ("outside") does not hold. A target holds on a set
when at least one predictor meets it; the markdown names which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PAPER_BUDGET",
    "PAPER_QUALITY",
    "TARGETS",
    "SetChecks",
    "check_targets",
    "targets_markdown",
]

PAPER_BUDGET = 40.0
"""The paper-style FLOPs (% of NoPrune) a predictor must reach for the "paper" target."""

PAPER_QUALITY = 0.97
"""The share of NoPrune's CIDEr a predictor must keep for the "paper" target."""

TARGETS = {
    "flops": "equal KV-cache FLOPs: >= FastV within 1 SE",
    "kv_read": "equal decode KV read: > FastV by >= 2 SE",
    "paper": "paper-style <= 40 %, >= 97 % of NoPrune, > FastV(k=2 r=0.5) and VTW",
    "dense": "dense keeps more image tokens than redundant",
}
"""Each target's one-line statement, as the markdown prints it."""

Row = Mapping[str, Any]


@dataclass
class SetChecks:
    """The DyRate rows of one caption set that meet each target: {target: [row names]}."""

    name: str
    met: dict[str, list[str]] = field(default_factory=dict)


def _paired_holds(row: Row, currency: str, ses: float) -> bool:
    """delta >= ses * se (and > 0 when ses > 0) against FastV in `currency`."""
    value = (row.get("vs_fastv") or {}).get(currency)
    if value is None:
        return False
    delta, se = value["delta"], value.get("se") or 0.0
    return delta >= ses * se and (ses <= 0 or delta > 0)


def _paper_holds(row: Row, rows: Sequence[Row]) -> bool:
    by_name = {r["name"]: r for r in rows}
    noprune = by_name.get("NoPrune")
    fastv = by_name.get("FastV(k=2 r=0.5)")
    vtw = [r["cider"] for r in rows if r["family"] == "VTW"]
    if noprune is None or fastv is None:
        return False
    return (
        row["paper_flops_percent"] <= PAPER_BUDGET
        and row["cider"] >= PAPER_QUALITY * noprune["cider"]
        and row["cider"] > fastv["cider"]
        and all(row["cider"] > c for c in vtw)
    )


def _style(set_name: str) -> str:
    return set_name.rsplit(" ", 1)[-1]


def check_targets(tables: Mapping[str, Sequence[Row]]) -> list[SetChecks]:
    """The targets met on each caption set of one model's tables (JSON rows by set name)."""
    out = []
    for name, rows in tables.items():
        dyrate = [r for r in rows if r["family"] == "DyRate"]
        met = {
            "flops": [r["name"] for r in dyrate if _paired_holds(r, "flops", -1.0)],
            "kv_read": [r["name"] for r in dyrate if _paired_holds(r, "kv_read_bytes", 2.0)],
            "paper": [r["name"] for r in dyrate if _paper_holds(r, rows)],
        }
        out.append(SetChecks(name, met))
    for checks in out:  # dense: the same predictor on the other style of the same split
        if _style(checks.name) != "dense":
            continue
        split = checks.name[: -len("dense")]
        redundant = tables.get(split + "redundant")
        if redundant is None:
            continue
        kept = {r["name"]: r["kept_image_tokens"] for r in redundant if r["family"] == "DyRate"}
        checks.met["dense"] = [
            r["name"]
            for r in tables[checks.name]
            if r["family"] == "DyRate"
            and r["name"] in kept
            and r["kept_image_tokens"] > kept[r["name"]]
        ]
    return out


def targets_markdown(models: Mapping[str, list[SetChecks]]) -> str:
    """A markdown table: one line per model and caption set, one column per target ("yes:
    names" / "no"; "-" where a target does not apply to the set)."""
    head = "| model | caption set | " + " | ".join(TARGETS.values()) + " |"
    lines = [head, "|" + "---|" * (2 + len(TARGETS))]
    for model, sets in models.items():
        for checks in sets:
            cells = []
            for target in TARGETS:
                if target not in checks.met:
                    cells.append("-")
                    continue
                names = checks.met[target]
                cells.append("yes: " + ", ".join(names) if names else "**no**")
            lines.append(f"| {model} | {checks.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
