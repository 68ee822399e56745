"""The sweep grammar -> Optuna distributions, and a trial's values -> job overrides.

Same grammar as the PyPI hydra-optuna-sweeper, on Optuna's current distribution classes:

=================================  =====================================================
``interval(a, b)``                 ``FloatDistribution(a, b)`` (Hydra makes a, b floats)
``tag(log, interval(a, b))``       ``FloatDistribution(a, b, log=True)``
``int(interval(a, b))``            ``IntDistribution(a, b)`` (``tag(log, ...)``: log=True)
``choice(x, y, ...)`` / ``x,y``    ``CategoricalDistribution([x, y, ...])``
``range(a, b[, s])``               ``IntDistribution`` / ``FloatDistribution(step=s)`` over
                                   exactly the values Hydra's ``range`` yields: b is NOT included
                                   (as in the basic sweeper; the PyPI plugin included it)
``shuffle(range(...))``            ``CategoricalDistribution`` of those values
a plain value                      fixed: passed to every job unchanged
=================================  =====================================================

``hydra.sweeper.params`` come first and the command line after; for one key the later one wins."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from .handoff import encode_value


@dataclass
class SearchSpace:
    """Searched params (Optuna name -> distribution), and the overrides every job gets unchanged."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    # Optuna name -> the key as written in the override (keeps a ``+`` or ``@package``)
    keys: dict[str, str] = field(default_factory=dict)
    # Optuna name -> the grammar text, e.g. "tag(log, interval(1e-6, 1e-2))": the study's identity
    spec: dict[str, str] = field(default_factory=dict)
    # categorical choices that are not Optuna-storable primitives (lists, dicts) are stored as text
    _choice_text: dict[str, dict[Any, str]] = field(default_factory=dict)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The job overrides for a trial's sampled ``params`` (searched params only)."""
        out = []
        for name, value in params.items():
            text = self._choice_text.get(name, {}).get(value)
            out.append(f"{self.keys[name]}={encode_value(value) if text is None else text}")
        return out

    def fingerprint(self) -> str:
        return json.dumps({"space": self.spec, "fixed": self.fixed}, sort_keys=True)


def _param_lines(params: Mapping[str, Any] | None) -> list[str]:
    """``hydra.sweeper.params`` as override lines; non-string YAML values written exactly."""
    return [f"{k}={v if isinstance(v, str) else encode_value(v)}" for k, v in (params or {}).items()]


def parse_search_space(params: Mapping[str, Any] | None, arguments: Sequence[str]) -> SearchSpace:
    """Parse ``hydra.sweeper.params`` and the command-line overrides into a search space."""
    lines = [*_param_lines(params), *arguments]
    latest: dict[str, Override] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.key_or_group if override.package is None else f"{override.key_or_group}@{override.package}"
        latest.pop(key, None)  # re-insert: the later one wins and keeps its place in the order
        latest[key] = override
    space = SearchSpace()
    for name, override in latest.items():
        if not override.is_sweep_override():
            space.fixed.append(override.input_line or "")
            continue
        space.distributions[name] = _distribution(name, override, space)
        space.keys[name] = override.get_key_element()
        space.spec[name] = override.get_value_string()
    return space


def _distribution(name: str, override: Override, space: SearchSpace) -> BaseDistribution:
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return _categorical(name, override, space)
    if isinstance(value, RangeSweep):
        return _range(name, override)
    if isinstance(value, IntervalSweep):
        return _interval(name, value)
    raise ValueError(f"{name}: {override.get_value_string()} is not a sweep the Optuna sweeper supports")


def _categorical(name: str, override: Override, space: SearchSpace) -> CategoricalDistribution:
    choices = []
    for item in override.sweep_iterator(transformer=Transformer.identity):
        if item is None or isinstance(item, (str, int, float, bool)):
            choices.append(item)
        else:  # a list or dict: Optuna stores its override text, the job gets it back as written
            text = Transformer.str(item)
            space._choice_text.setdefault(name, {})[text] = text
            choices.append(text)
    return CategoricalDistribution(choices)


def _range(name: str, override: Override) -> BaseDistribution:
    values = list(override.sweep_iterator(transformer=Transformer.identity))
    if not values:
        raise ValueError(f"{name}: {override.get_value_string()} is empty")
    value = override.value()
    assert isinstance(value, RangeSweep)
    step = abs(value.step)
    low, high = min(values), max(values)
    if all(isinstance(v, int) for v in values) and isinstance(step, int):
        return IntDistribution(low, high, step=step)
    return FloatDistribution(float(low), float(high), step=float(step))


def _interval(name: str, value: IntervalSweep) -> BaseDistribution:
    log = "log" in value.tags
    if value.start is None or value.end is None:
        raise ValueError(f"{name}: an interval needs both ends")
    if isinstance(value.start, int) and isinstance(value.end, int):  # int(interval(a, b))
        return IntDistribution(value.start, value.end, log=log)
    return FloatDistribution(float(value.start), float(value.end), log=log)


def grid_values(name: str, distribution: BaseDistribution) -> list[Any]:
    """Every value of a discrete distribution, for the grid sampler."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution) and not distribution.log:
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    if isinstance(distribution, FloatDistribution) and distribution.step is not None:
        count = round((distribution.high - distribution.low) / distribution.step) + 1
        return [distribution.low + i * distribution.step for i in range(count)]
    raise ValueError(f"the grid sampler needs discrete values, but {name} is continuous: use choice(...) or range(...)")


def short_hash(*parts: str) -> str:
    """8 hex digits identifying ``parts``: short enough for a study name, long enough not to collide."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]
