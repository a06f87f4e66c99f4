"""Stage 2's input checks, run once in the parent before any shard job starts (a job that fails on a bad input
would fail, and be retried, in every shard).

`check_inputs` follows the contract of every stage's input check (docs/architecture.md, "Input checks"): the config
first, the inputs by keyword, one ValueError of one line naming the input and the fix, and one typed value back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from d4ir.shards.embeddings import load_embeddings
from d4ir.shards.io import sha256_file
from d4ir.shards.records import Provenance, RoundManifest

from .embed import prompt_encoder_file
from .plan import SynthConfig
from .sd import SDSource
from .sd_parts import SDParts


@dataclass(frozen=True)
class SynthInputs:
    """What checking stage 2's inputs found out: what the plan draws from and what the manifest records.

    Args:
        num_prompts: rows of the prompt table a sample's prompt row is drawn from (1 in the modes without one).
        provenance: what makes the round's samples, recorded in its manifest and every sample.
    """

    num_prompts: int
    provenance: Provenance


def check_inputs(config: SynthConfig, *, sd: SDParts, source: SDSource, prompts_dir: Path | None) -> SynthInputs:
    """Every error a shard job would hit on its inputs (the SD loaded from `source`, stage 1's prompts), found once.

    Returns the prompt rows to draw from and the provenance the manifest and every sample record.
    """
    made = Provenance(source.spec, source.config, sd.fingerprint)
    if config.prompt_mode == "text" and (sd.text_encoder is None or sd.tokenizer is None):
        raise ValueError(f"prompt mode 'text' needs an SD with a text encoder; {source} has none")
    if config.prompt_mode not in ("encoder", "content"):
        return SynthInputs(1, made)
    if prompts_dir is None:
        raise ValueError(f"prompt mode {config.prompt_mode!r} needs the prompts folder of `d4ir prompts`")
    if config.prompt_mode == "content":
        return SynthInputs(1, replace(made, prompt_encoder_file_sha256=sha256_file(prompt_encoder_file(prompts_dir))))
    emb = load_embeddings(prompts_dir)
    n, _, width = emb.prompt_embeds.shape
    if n == 0:
        raise ValueError(f"{prompts_dir}: the prompt table is empty (0 rows); rerun `d4ir prompts`")
    made_for = emb.metadata.get("sd_fingerprint", "")  # the models first: a width names neither
    if made_for and made_for != sd.fingerprint:
        widths = f", {width} wide vs {sd.cross_attention_dim}" if width != sd.cross_attention_dim else ""
        raise ValueError(f"{prompts_dir}: the prompts were made for SD {emb.metadata.get('sd_model_id')!r} "
                         f"(fingerprint {made_for[:12]}), but this run loads SD {source} (fingerprint "
                         f"{sd.fingerprint[:12]}{widths}): make the prompts with this SD or load theirs")
    if width != sd.cross_attention_dim:
        raise ValueError(f"{prompts_dir}: prompts are {width} wide, but SD {source} takes {sd.cross_attention_dim} "
                         "(cross_attention_dim): make the prompts with this SD")
    return SynthInputs(n, replace(made, encoder_sha256=emb.metadata.get("encoder_sha256", "")))


def check_sd(manifest: RoundManifest, sd: SDParts, source: SDSource, folder: Path) -> None:
    """The round in `folder` was synthesized by the SD this run loaded (by fingerprint, whatever its path)."""
    made = manifest.provenance
    if made.sd_fingerprint != sd.fingerprint:
        raise ValueError(f"{folder} was synthesized by SD {made.sd!r} (fingerprint {made.sd_fingerprint[:12]}), "
                         f"but this run loads {source} (fingerprint {sd.fingerprint[:12]})")
