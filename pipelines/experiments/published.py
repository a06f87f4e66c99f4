"""The paper's published numbers (Wang et al., D4IR, Tables 1-5), as facts beside our results in the report.

Each entry is (PSNR dB, SSIM, Params M or None). The paper does not say whether it scores RGB or the Y channel;
the report puts these numbers beside our RGB columns. Desnowing and the all-in-one setting have no table in the
main paper (`NOT_PUBLISHED` says why), so their reports show no published column.
"""

from __future__ import annotations

Published = tuple[float, float, float | None]

PUBLISHED: dict[str, dict[str, Published]] = {
    # Table 1: deraining on Rain100L, AirNet teacher, Half-AirNet students
    "1": {
        "Teacher": (34.90, 0.966, 8.52),
        "Student": (30.88, 0.924, 4.26),
        "Data": (29.12, 0.883, 4.26),
        "DFSR": (28.39, 0.859, 4.26),
        "DFMC": (29.59, 0.882, 4.26),
        "D4IR": (30.03, 0.906, 4.26),
    },
    # Table 2: dehazing on SOTS
    "2": {
        "Teacher": (25.75, 0.946, 8.93),
        "Student": (25.69, 0.944, 4.46),
        "Data": (25.63, 0.945, 4.46),
        "DFSR": (21.33, 0.890, 4.46),
        "DFMC": (21.96, 0.900, 4.46),
        "D4IR": (25.67, 0.946, 4.46),
    },
    # Table 3: break-down ablation on Rain100L (z0 and prompt of the frozen SD)
    "3": {
        "M0": (28.69, 0.876, None),
        "M1": (28.38, 0.879, None),
        "M2": (28.20, 0.862, None),
        "M3": (29.08, 0.893, None),
        "M4": (29.02, 0.888, None),
        "M5": (29.60, 0.903, None),
        "D4IR": (30.03, 0.906, None),
    },
    # Table 4: real rain, SPA
    "4": {
        "Teacher": (33.59, 0.935, None),
        "Student": (33.55, 0.933, None),
        "Data": (33.45, 0.932, None),
        "D4IR": (33.53, 0.932, None),
    },
    # Table 5: Restormer teacher (dim 24), student dim 12, deraining on Rain100L
    "5": {
        "Teacher": (35.75, 0.964, None),
        "Student": (28.37, 0.895, None),
        "Data": (26.21, 0.851, None),
        "D4IR": (26.01, 0.817, None),
    },
}

NOT_PUBLISHED: dict[str, str] = {
    "desnow": "the main paper gives its desnowing results (Snow100K) only in the supplementary material, "
              "which is not available here: no published column",
    "all": "the main paper publishes no all-in-one table: no published column",
    "demo": "the demo runs on scikit-image photos, not the paper's data: no published column",
}


# The real-parts table (this project's, not the paper's) shows the paper's closest table beside it, for context:
# Table 1 with Table 3's ablation rows for deraining, Table 2 for dehazing.
CONTEXT: dict[str, dict[str, Published]] = {
    "derain": {**PUBLISHED["3"], **PUBLISHED["1"]},
    "dehaze": PUBLISHED["2"],
}
CONTEXT_NOTE = (
    "The paper columns of this table are the paper's Table {tables} for context only: its teacher is an AirNet "
    "trained on the test set's own training data and its synthesis is Stable Diffusion at 256 px, so they are "
    "not the same experiment; compare gaps to the teacher, not absolute numbers. Procedural is not in the paper.")


def published(table: str, row: str, task: str | None = None) -> Published | None:
    """The paper's (PSNR, SSIM, Params) of `row` in `table` (for the real-parts table: in the paper's table of
    `task`, `CONTEXT`), or None where it publishes none."""
    if table == "real":
        return CONTEXT.get(task or "", {}).get(row)
    return PUBLISHED.get(table, {}).get(row)
