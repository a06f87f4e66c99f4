"""Value checks the stage configs share, each raising one ValueError that names the field and its option."""

from __future__ import annotations

import math


def check_rate(name: str, value: object, *, zero_ok: bool = False, owner: str = "") -> None:
    """A learning rate must be a finite number > 0 (>= 0 with `zero_ok`: 0 freezes what it drives). Checked in
    the config, not at the optimizer's start-up, so that the message names the option (`--encoder-lr`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > 0 or (zero_ok and value == 0))):
        raise ValueError(f"{owner}{name} (--{name.replace('_', '-')}) must be a finite number "
                         f"{'>= 0' if zero_ok else '> 0'}, got {value!r}")


def check_positive_ints(config: object, names: tuple[str, ...], *, owner: str = "") -> None:
    """Each field `names` of `config` must be an int >= 1 (a bool is not an int here: True is no batch size)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}{name} must be a positive int, got {value!r}")


def check_choice(name: str, value: object, allowed: tuple, *, owner: str = "") -> None:
    """`value` must be one of `allowed` (a config's Literal read with typing.get_args: one declaration)."""
    if value not in allowed:
        raise ValueError(f"{owner}{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
