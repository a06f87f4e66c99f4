"""The paper's experiments from one resumable command: `d4ir experiments CONFIG`.

config.py / config_parse.py   the JSON config (validated dataclasses; paths relative to the file)
tables.py, published.py       the paper's tables (rows, defaults) and its published PSNR/SSIM
datasets.py, matrix_data.py   named dataset builders on the shared images (rain100l-split, weather-matrix)
inputs.py                     a task's folders as the stages read them (several mixed into one: all-in-one)
steps.py, rows.py             resumable steps with done markers: teachers, stage 1, round 0, ablation rounds, rows
runner.py                     plan (what runs, what is skipped and why) and run; report.py writes OUT/report.md
"""

from .config import ExperimentConfig, load_config
from .runner import run_experiments

__all__ = ["ExperimentConfig", "load_config", "run_experiments"]
