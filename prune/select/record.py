"""What a selection decided, kept for the samples that come later (`ssl-prune extend`).

The select stage writes `selection/cuts.npz` beside `scores/`: per selection group (a cluster when
balanced, else one group) and band edge, the exact priority threshold a sample must reach, the
histogram its percentiles were read from, and the CCS strata when the policy used them; and
`selection/selection.json`: the select settings as applied (what `auto` chose included), k, the
edges and the fingerprint. A new sample given the same priority function and these thresholds gets
the decision it would have got in this run: that is how an extension selects without re-reading
or re-ranking the parent's samples.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np

from prune import schema
from prune.select.cuts import CutPlan, Cuts, HistogramSpec
from prune.select.strata import Strata

CUTS_FILE = "cuts.npz"
SELECTION_FILE = "selection.json"


@dataclass
class SelectionRecord:
    cuts: Cuts
    hist: np.ndarray  # [G, bins]: the selection's priority histogram (percentiles of new samples)
    strata: Optional[Strata]
    meta: dict  # settings as applied, k, edges, fingerprint

    @property
    def edges(self) -> list[float]:
        return list(self.cuts.plan.edges)


def save(out, cuts: Cuts, hist: np.ndarray, strata: Optional[Strata], meta: dict) -> None:
    """`selection/` of a finished selection (the json last: present means complete)."""
    arrays = {"cut": cuts.cut, "any_kept": cuts.any_kept, "hist": hist, "edges": np.asarray(cuts.plan.edges, np.float64),
              "bits": np.asarray(cuts.plan.spec.bits)}
    if strata is not None:
        arrays |= {"strata_lo": strata.lo, "strata_hi": strata.hi, "strata_sizes": strata.sizes,
                   "strata_n": np.asarray(strata.n)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out.write_bytes(buf.getvalue(), schema.SELECTION_DIR, CUTS_FILE)
    out.write_json(meta, schema.SELECTION_DIR, SELECTION_FILE)


def load_meta(out) -> Optional[dict]:
    """`selection.json` alone (what was applied, the fingerprint), or None."""
    return out.read_json(schema.SELECTION_DIR, SELECTION_FILE) if out.exists(schema.SELECTION_DIR, SELECTION_FILE) else None


def load(out) -> Optional[SelectionRecord]:
    """The record a select stage left in `out` (an OutputDir), or None (an output made before it)."""
    if not out.exists(schema.SELECTION_DIR, SELECTION_FILE):
        return None
    meta = out.read_json(schema.SELECTION_DIR, SELECTION_FILE)
    with out.open(schema.SELECTION_DIR, CUTS_FILE) as f:
        z = np.load(io.BytesIO(f.read()))
    cut, any_kept = z["cut"], z["any_kept"]
    spec = HistogramSpec(int(cut.shape[0]), int(z["bits"]))
    shape = cut.shape
    plan = CutPlan(spec, [float(e) for e in z["edges"]], np.zeros(shape, np.int64), np.full(shape, -1, np.int64),
                   np.zeros(shape, np.int64))
    strata = None
    if "strata_lo" in z:
        strata = Strata(z["strata_lo"], z["strata_hi"], int(z["strata_n"]), z["strata_sizes"])
    return SelectionRecord(Cuts(plan, cut, any_kept), z["hist"], strata, meta)
