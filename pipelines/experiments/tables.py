"""The paper's tables as data: which rows each table has, what each row trains on, and what it needs.

A row is one trained (or scored) model: the teacher itself, a student trained on the teacher's pairs with
ground truth ("Student"), or a student distilled (Eq. 8) from one data source: the teacher's own degraded
inputs ("Data"), a generator trained against the student (DFSR, DFMC), the web degraded photos (M0), a
shard round synthesized by the frozen SD with Table 3's switches (M1-M5: z0 = noise or the CCD latent of a web
clean photo, Eq. 6; prompt = the weather's text, the prompt encoder's embedding of a web degraded photo (DPA),
the encoder applied to the clean photo itself ("content") or the empty text), or the full method (D4IR: CCD +
DPA, with the joint phase L_kd + gamma L_cl of Eq. 9 and regeneration rounds). A row is identified by
(task, teacher, row): tables that share it (Tables 1, 3 and 4 share D4IR) train it once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowDef:
    """One kind of row.

    Args:
        key: the row's name in configs and the report (Teacher, Student, Data, ..., D4IR).
        type: the report's Type column (Input, Teacher, Student, KD, Ablation).
        label: the report's Method column.
        data: the stage-3 data source (DistillConfig.data), or None for rows trained without distillation.
        z0: the ablation rounds' start latent (CCDConfig.z0); None outside M1-M5.
        prompt: the ablation rounds' prompt mode (SynthConfig.prompt_mode); None outside M1-M5.
        needs: task parts the row cannot run without (original, web_degraded, web_clean, text).
    """

    key: str
    type: str
    label: str
    data: str | None = None
    z0: str | None = None
    prompt: str | None = None
    needs: tuple[str, ...] = ()

    @property
    def ablation(self) -> bool:
        return self.z0 is not None


_WEB = ("web_degraded", "web_clean")
ROWS: dict[str, RowDef] = {r.key: r for r in (
    RowDef("Input", "Input", "Degraded input"),
    RowDef("Teacher", "Teacher", "Teacher"),
    RowDef("Student", "Student", "Half-width student on the teacher's pairs (GT)", needs=("original",)),
    RowDef("Data", "KD", "Data (the teacher's degraded inputs)", data="original", needs=("original",)),
    RowDef("DFSR", "KD", "DFSR (GAN generator)", data="dfsr"),
    RowDef("DFMC", "KD", "DFMC (GAN generator + contrastive)", data="dfmc"),
    RowDef("M0", "Ablation", "M0 (web degraded photos)", data="web", needs=("web_degraded",)),
    RowDef("M1", "Ablation", "M1 (z0 noise, text)", "shards", "noise", "text", ("web_clean", "text")),
    RowDef("M2", "Ablation", "M2 (z0 noise, DPA)", "shards", "noise", "encoder", _WEB),
    RowDef("M3", "Ablation", "M3 (z0 noise, content)", "shards", "noise", "content", _WEB),
    RowDef("M4", "Ablation", "M4 (CCD, no prompt)", "shards", "ccd", "none", ("web_clean",)),
    RowDef("M5", "Ablation", "M5 (CCD, text)", "shards", "ccd", "text", ("web_clean", "text")),
    RowDef("D4IR", "KD", "D4IR (ours: CCD + DPA, joint phase, rounds)", data="shards", needs=_WEB),
    # not in the paper: the physical weather renderer on the web clean photos (pipelines/experiments/procedural.py)
    RowDef("Procedural", "Baseline", "Procedural (physical weather on web clean photos; this project's baseline, "
           "not in the paper)", data="web", needs=("web_clean",)),
)}
# The order rows run and are listed in: the teacher first (every other row needs it).
ROW_ORDER = tuple(ROWS)


@dataclass(frozen=True)
class TableDef:
    """One of the paper's tables.

    Args:
        name: its key in configs (1-5, desnow, all, real).
        title: the report's heading.
        task: the task it runs on by default.
        teacher: the task's teacher field it distils (teacher, or restormer_teacher for Table 5).
        tests: the test sets it is scored on by default (None: every test set of the task).
        rows: its rows, in the paper's order.
    """

    name: str
    title: str
    task: str
    teacher: str
    tests: tuple[str, ...] | None
    rows: tuple[str, ...]


_TABLE1 = ("Teacher", "Student", "Data", "DFSR", "DFMC", "D4IR")
TABLES: dict[str, TableDef] = {t.name: t for t in (
    TableDef("1", "Table 1: deraining (Rain100L)", "derain", "teacher", ("Rain100L",), _TABLE1),
    TableDef("2", "Table 2: dehazing (SOTS)", "dehaze", "teacher", ("SOTS",), _TABLE1),
    TableDef("3", "Table 3: break-down ablation on deraining (Rain100L)", "derain", "teacher", ("Rain100L",),
             ("M0", "M1", "M2", "M3", "M4", "M5", "D4IR")),
    TableDef("4", "Table 4: real rain (SPA)", "derain", "teacher", ("SPA",), ("Teacher", "Student", "Data", "D4IR")),
    TableDef("5", "Table 5: Restormer teacher, deraining (Rain100L)", "derain", "restormer_teacher", ("Rain100L",),
             ("Teacher", "Student", "Data", "D4IR")),
    TableDef("desnow", "Desnowing (supplement; Snow100K)", "desnow", "teacher", ("Snow100K",), _TABLE1),
    TableDef("all", "All-in-one: one student for rain, haze and snow", "all", "teacher", None, _TABLE1),
    # the embedded demo (configs/demo.json, `make demo`): the shipped demo teacher, scikit-image photos
    TableDef("demo", "The demo: the shipped demo teacher, scikit-image photos, the weather LDM", "derain", "teacher",
             None, ("Input", "Teacher", "Student", "Data", "M0", "D4IR")),
    # the real-parts setting: a published teacher, real web photos, every baseline (configs/real-*.json)
    TableDef("real", "Real parts: a published teacher, its real test set, real web photos", "derain", "teacher",
             None, ("Input", "Teacher", "Data", "M0", "Procedural", "DFSR", "DFMC", "M1", "M2", "M3", "M4", "M5",
                    "D4IR")),
)}

TEACHER_FIELDS = ("teacher", "restormer_teacher")
# Folder names of a task's teachers and the prefix of their students' folders.
TEACHER_NAMES = {"teacher": "main", "restormer_teacher": "restormer"}
