"""The library entry points the experiments call, in one namespace: every stage runs through here, so a test
can replace them all and prove that a rerun of a finished matrix trains, synthesizes and scores nothing."""

from distill.evaluate import evaluate
from distill.teacher import train_supervised
from distill.trainer import distill
from synth.prompts import train_prompts
from synth.sd import load_sd_cached
from synth.worker import synthesize

__all__ = ["distill", "evaluate", "load_sd_cached", "synthesize", "train_prompts", "train_supervised"]
