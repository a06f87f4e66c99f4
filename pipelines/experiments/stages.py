"""The library entry points the experiments call, in one namespace: every stage runs through here, so a test
can replace them all and prove that a rerun of a finished matrix trains, synthesizes and scores nothing."""

from d4ir.distill.evaluate import evaluate
from d4ir.distill.teacher import train_supervised
from d4ir.distill.trainer import distill
from d4ir.synth.prompts import train_prompts
from d4ir.synth.sd import load_sd_cached
from d4ir.synth.worker import synthesize

__all__ = ["distill", "evaluate", "load_sd_cached", "synthesize", "train_prompts", "train_supervised"]
