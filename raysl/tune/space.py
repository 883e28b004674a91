"""SPACE.yaml: which config keys a Tune search varies, and how.

    optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    optim.weight_decay: {uniform: [0.0, 0.1]}
    method.temperature: {choice: [0.1, 0.2, 0.5]}
    data.batch_size: {randint: [8, 33]}     # upper bound exclusive, as numpy/Ray

Every key is checked against the config dataclasses (it must exist, and every value
the distribution can produce must be valid for that key) before Ray starts.
"""

from __future__ import annotations

import dataclasses
import typing

import yaml

from raysl.config import Config, check_value, load_yaml, method_config, section_fields
from raysl.errors import UserError

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")


@dataclasses.dataclass(frozen=True)
class Param:
    key: str  # section.key
    kind: str  # one of DISTRIBUTIONS
    args: tuple

    def tune_domain(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def values_to_check(self) -> list:
        return (
            list(self.args)
            if self.kind == "choice"
            else [self.args[0], self.args[1] - 1 if self.kind == "randint" else self.args[1]]
        )


def _field(key: str, origin: str, method: str) -> dataclasses.Field:
    if key.count(".") != 1:
        raise UserError(f"{origin}: key {key!r} must be section.key, e.g. optim.lr")
    section, name = key.split(".")
    sections = section_fields(Config)
    if section not in sections:
        raise UserError(f"{origin}: key {key}: unknown section {section!r}; sections are {', '.join(sections)}")
    cls = type(method_config(method)) if section == "method" else typing.get_type_hints(Config)[section]
    fields = section_fields(cls)
    if name not in fields and section == "method":
        raise UserError(f"{origin}: config key {key} is unknown to method {method}; it has {', '.join(fields)}")
    if name not in fields:
        raise UserError(f"{origin}: config key {key} is unknown; {section} has {', '.join(fields)}")
    f = dataclasses.field(metadata=fields[name].metadata)
    f.type = typing.get_type_hints(cls)[name]
    return f


def parse_space(raw, origin: str = "space", method: str = "simclr") -> list[Param]:
    """The search space; `method.*` keys are checked against `method`'s keys (the recipe's method)."""
    if not isinstance(raw, dict) or not raw:
        raise UserError(
            f"{origin}: expected a mapping of section.key to a distribution, "
            "e.g. optim.lr: {loguniform: [1.0e-4, 1.0e-2]}"
        )
    params = []
    for key, dist in raw.items():
        key = str(key)
        f = _field(key, origin, method)
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise UserError(
                f"{origin}: {key}: expected one of {', '.join('{' + d + ': ...}' for d in DISTRIBUTIONS)}, got {dist!r}"
            )
        kind, args = next(iter(dist.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise UserError(f"{origin}: {key}: choice needs a non-empty list of values, got {args!r}")
        else:
            if not (
                isinstance(args, list)
                and len(args) == 2
                and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
            ):
                raise UserError(f"{origin}: {key}: {kind} needs [low, high] numbers, got {args!r}")
            lo, hi = args
            if not lo < hi:
                raise UserError(f"{origin}: {key}: {kind} needs low < high, got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise UserError(f"{origin}: {key}: loguniform needs low > 0, got {lo}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise UserError(f"{origin}: {key}: randint needs integer bounds, got {args!r}")
            if kind in ("loguniform", "uniform") and f.type is int:
                raise UserError(f"{origin}: {key} is an integer key: use randint or choice, not {kind}")
        param = Param(key, kind, tuple(args))
        for value in param.values_to_check():
            try:
                check_value(key, f, value)
            except UserError as exc:
                raise UserError(f"{origin}: {exc} (from {kind} {list(args)})") from None
        params.append(param)
    return params


def load_space(path: str, method: str = "simclr") -> list[Param]:
    try:
        with open(path) as f:
            raw = load_yaml(f)
    except FileNotFoundError:
        raise UserError(f"--space {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from exc
    return parse_space(raw, origin=path, method=method)


def apply(raw: dict, values: dict) -> dict:
    """A config dict (Config.to_dict()) with `values` ({section.key: value}) set."""
    out = {section: dict(keys) for section, keys in raw.items()}
    for key, value in values.items():
        section, name = key.split(".")
        out[section][name] = value
    return out
