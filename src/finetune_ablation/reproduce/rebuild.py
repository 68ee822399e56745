"""Rebuild a logged run's config without trusting the store it came from.

A run read from a tracking server is untrusted input: its ``config.yaml`` and Hydra overrides are
parsed as data (YAML safe loading, Hydra's override grammar), never instantiated, imported or
resolved. Anything that could name code (``_target_`` and Hydra's other instantiate keys) or read this
machine (``${...}`` interpolations) is refused, and the config must fit the typed schema exactly: an
unknown key is refused, not ignored. The one block dropped instead is ``optuna``, the sweeper's hand-off
to its live study: a reproduction never reports to that study, so the block is never read (its pruner
``_target_`` is legitimate there, and is never instantiated either). Today's ``conf/`` re-composed with
the logged overrides is a cross-check only: where it differs from the logged config, the logged value
wins."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .. import record as rec
from ..config import NOT_HASHED, Config, register_configs, role_of, validate
from ..errors import UserError
from ..paths import CONF_DIR
from ..tracking import flatten

# Keys that make hydra.utils.instantiate import and call code.
INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})
_OPTION_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")  # a config-group option: no paths
# The Optuna sweeper's hand-off to its live study (study, storage, trial, a pruner ``_target_``).
SWEEP_HANDOFF_KEY = "optuna"


@dataclass
class Rebuilt:
    cfg: DictConfig  # the logged config, validated against the schema: what runs again
    overrides: list[str]
    differences: list[tuple[str, Any, Any]] = field(default_factory=list)  # key, logged, re-composed
    warnings: list[str] = field(default_factory=list)


def find_keys(node: Any, names: frozenset[str], path: str = "") -> list[str]:
    """Dotted paths of every dict key in ``names``, at any depth (lists included)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key in names:
                found.append(here)
            found += find_keys(value, names, here)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            found += find_keys(value, names, f"{path}[{i}]")
    return found


def find_interpolations(node: Any, path: str = "") -> list[str]:
    """Dotted paths of every string (key or value) holding ``${``: OmegaConf would resolve it here."""
    if isinstance(node, str):
        return [path or "<value>"] if "${" in node else []
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            found += [here] if "${" in str(key) else []
            found += find_interpolations(value, here)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            found += find_interpolations(value, f"{path}[{i}]")
    return found


def _refuse_code(node: Any, what: str) -> None:
    targets = find_keys(node, INSTANTIATE_KEYS)
    if targets:
        raise UserError(
            f"{what} names code to instantiate ({', '.join(targets)}): refused, nothing a logged run "
            "names is ever imported or run here"
        )


# ---------------------------------------------------------------------------------------------------
# The logged resolved config


def download_text(client: mlflow.MlflowClient, run_id: str, path: str) -> str | None:
    """One small text artifact of a run, or None when the run has no such file."""
    names = {a.path for a in client.list_artifacts(run_id, str(Path(path).parent) if "/" in path else None)}
    if path not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        return Path(local).read_text()


def load_logged_config(text: str, run_id: str) -> dict[str, Any]:
    """The YAML as plain data: safe loading, so no Python tags and no objects."""
    what = f"the logged config.yaml of run {run_id}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{what} is not valid YAML ({str(exc).splitlines()[0]}): refused") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} is not a mapping of settings: refused")
    return data


def drop_sweep_handoff(data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A reproduction never joins the live Optuna study of the sweep it came from: the hand-off block
    is dropped unread (so the pruner ``_target_`` it legitimately holds is never instantiated)."""
    if data.get(SWEEP_HANDOFF_KEY) is None:
        return data, False
    return {k: v for k, v in data.items() if k != SWEEP_HANDOFF_KEY}, True


def check_untrusted(data: dict[str, Any], run_id: str) -> None:
    """Refuse what could name code or read this machine, anywhere in the config."""
    what = f"the logged config.yaml of run {run_id}"
    _refuse_code(data, what)
    interpolations = find_interpolations(data)
    if interpolations:
        raise UserError(
            f"{what} holds interpolations (${{...}} at {', '.join(interpolations)}), which a resolved "
            "config never does: refused, they could read this machine's environment"
        )


def validate_against_schema(data: dict[str, Any], run_id: str) -> DictConfig:
    """Merge into the typed schema: an unknown key or a wrong type is refused, then the range checks."""
    what = f"the logged config.yaml of run {run_id}"
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), data)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or "?"
        reason = str(exc).splitlines()[0]
        raise UserError(
            f"{what} does not fit the schema (finetune_ablation.config.Config) at {key}: {reason}; refused"
        ) from None
    try:
        validate(cfg)
    except UserError as exc:
        raise UserError(f"{what} fails the range checks: {exc}") from None
    return cfg


# ---------------------------------------------------------------------------------------------------
# The logged Hydra overrides, re-composed with today's conf/


def logged_overrides(client: mlflow.MlflowClient, run: Run) -> tuple[list[str], str]:
    """The run's Hydra task overrides: the exact list in ``.hydra/overrides.yaml`` when the CLI logged
    it, else the space-joined ``hydra.overrides`` tag."""
    text = download_text(client, run.info.run_id, rec.HYDRA_OVERRIDES_YAML)
    if text is not None:
        data = yaml.safe_load(text)
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return data, f"the artifact {rec.HYDRA_OVERRIDES_YAML}"
    tag = run.data.tags.get(rec.HYDRA_OVERRIDES_TAG)
    if tag is None:
        return [], "none logged"
    return rec.parse_overrides(tag), f"the tag {rec.HYDRA_OVERRIDES_TAG}"


def _override_values(override: Override) -> Any:
    return None if override.is_delete() or override.is_sweep_override() else override.value()


def _is_handoff(override: Override) -> bool:
    return override.key_or_group.split(".")[0] == SWEEP_HANDOFF_KEY


def check_overrides(overrides: list[str], run_id: str) -> tuple[list[str], str | None]:
    """Parse as Hydra grammar; refuse code and Hydra's own settings; drop the sweep's hand-off.
    Returns the overrides to re-compose with, and why they cannot be re-composed safely (then the
    logged config is used without the cross-check), or None."""
    what = f"the logged Hydra overrides of run {run_id}"
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # Hydra raises its own OverrideParseException
        return [], f"they do not parse ({str(exc).splitlines()[0]})"
    kept = [o for o in parsed if not _is_handoff(o)]
    for o in kept:
        segments = set(re.split(r"[./@]", o.key_or_group))
        if segments & INSTANTIATE_KEYS:
            raise UserError(f"{what} set {o.key_or_group}, which names code to instantiate: refused")
        if o.is_hydra_override() or o.key_or_group.split("/")[0] == "hydra" or o.package is not None:
            raise UserError(f"{what} change Hydra itself ({o.input_line}): refused, a job never logs those")
        _refuse_code(_override_values(o), what)
    lines = [o.input_line for o in kept]
    for o in kept:
        if o.is_sweep_override():
            return lines, f"{o.input_line} is a sweep, not one job's value"
        if find_interpolations(_override_values(o)):
            return lines, f"{o.input_line} holds an interpolation that would be resolved here"
        value = _override_values(o)
        is_choice = "." not in o.key_or_group and isinstance(value, str)
        if is_choice and not _OPTION_NAME.match(value):
            return lines, f"{o.input_line} is not a config-group option name"
    return lines, None


def compose_today(overrides: list[str]) -> DictConfig:
    """Today's conf/ with the overrides, exactly as ``ablate`` composes it (nothing instantiated)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _flat(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return {k: v for k, v in flatten(container).items() if role_of(k) not in NOT_HASHED}


def differences(logged: DictConfig, recomposed: DictConfig) -> list[tuple[str, Any, Any]]:
    """Keys whose logged value differs from today's composition: the keys that are not ``recording`` or
    ``display`` (config.Role; tracking.* is set anew for the reproduction anyway)."""
    a, b = _flat(logged), _flat(recomposed)
    missing = "(absent)"
    return [
        (k, a.get(k, missing), b.get(k, missing))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]


def rebuild(client: mlflow.MlflowClient, run: Run) -> Rebuilt:
    """The config to run again: the logged one, checked, cross-checked against today's composition."""
    run_id = run.info.run_id
    text = download_text(client, run_id, rec.CONFIG_YAML)
    if text is None:
        raise UserError(f"run {run_id} has no config.yaml artifact: it was not logged by a finished ablate run")
    data, was_trial = drop_sweep_handoff(load_logged_config(text, run_id))
    check_untrusted(data, run_id)
    cfg = validate_against_schema(data, run_id)
    overrides, source = logged_overrides(client, run)
    kept, unsafe = check_overrides(overrides, run_id)
    rebuilt = Rebuilt(cfg, kept)
    if was_trial:
        rebuilt.warnings.append(
            f"run {run_id} was a trial of an Optuna sweep: it runs again outside that study (its logged "
            f"{SWEEP_HANDOFF_KEY} hand-off, pruner included, is dropped and never instantiated)"
        )
    if source == "none logged":
        rebuilt.warnings.append(
            f"run {run_id} logged no Hydra overrides (not started by the ablate CLI): its logged config is "
            "used without the cross-check against today's conf/"
        )
        return rebuilt
    if unsafe:
        rebuilt.warnings.append(f"not re-composed with today's conf/ ({unsafe}): using the logged config as is")
        return rebuilt
    try:
        rebuilt.differences = differences(cfg, compose_today(kept))
    except Exception as exc:  # a group option or key that today's conf/ no longer has, etc.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        rebuilt.warnings.append(
            f"today's conf/ cannot compose the logged overrides ({reason}): using the logged config"
        )
    return rebuilt
