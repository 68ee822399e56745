"""``ablate``: the Hydra app. One job = one MLflow run (its lifecycle: ``run/job.py``); every Hydra
override, ``--help``, ``--cfg job`` and ``-m`` multirun work as in any Hydra app. Studies in
``experiments/*.yaml`` are the ``experiment`` config group (global package), so ``ablate experiment=demo``
selects one."""

from __future__ import annotations

import os
import sys

# TF's C++ start-up chatter hides the one line a user needs; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra
from omegaconf import DictConfig

from .config import register_configs
from .paths import CONF_DIR
from .run.job import run_job


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> float | None:
    return run_job(cfg)


def _config_error_line(exc: BaseException) -> str:
    """Hydra's message for a config it cannot compose, as one line that ends with the fix."""
    from hydra.errors import InstantiationException, MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException) and exc.options:
        group = (exc.missing_cfg_file or "").rsplit("/", 1)[0]
        wanted = (exc.missing_cfg_file or "").rsplit("/", 1)[-1]
        return f"{group}={wanted} is not an option of '{group}': use one of {', '.join(exc.options)}"
    # a failed constructor (e.g. a sweeper setting out of range): its own message says it all
    errors = [exc.__cause__] if isinstance(exc, InstantiationException) and exc.__cause__ else [exc, exc.__cause__]
    parts: list[str] = []
    for err in errors:
        text = str(err).strip() if err is not None else ""
        for line in (ln.strip().rstrip(".") for ln in text.splitlines() if ln.strip() and not ln.startswith(" ")):
            if not line.startswith(("Set the environment", "full_key", "See ")) and line not in " ".join(parts):
                parts.append(line)
    hint = "`ablate --cfg job` lists every key with its type and default"
    if isinstance(exc, InstantiationException):
        hint = "`ablate --cfg hydra` shows the sweeper's and launcher's settings"
    elif isinstance(exc, OverrideParseException):
        hint = "check the override's grammar (https://hydra.cc/docs/advanced/override_grammar/basic/)"
    return f"{': '.join(parts) or type(exc).__name__}: {hint}"


def main() -> None:
    """Console-script entry point (``ablate``).

    Exit status: 0 done; 1 a job of a multirun failed (the sweep callback decides, run/parent_run.py), a
    launcher's job ended without a result (a cancelled SLURM job: one ``error: ...`` line) or a bug
    (traceback); 2 bad input: a config Hydra cannot compose (unknown group option, misspelt key, wrong
    type, bad override or search grammar, bad sweeper setting) or a bad value or store (one
    ``error: ...`` line, no traceback). ``HYDRA_FULL_ERROR=1`` shows Hydra's full message instead."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from . import liveness

    register_configs()
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's config errors reach us instead of printing them
    try:
        with liveness.ending_open_runs():  # an error, Ctrl-C or SIGTERM ends the runs still open
            _app()
    except (HydraException, OmegaConfBaseException) as exc:
        if full_error:
            raise
        print(f"error: {_config_error_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # a launcher's job that ended without a result (a cancelled SLURM job)
        from .lost_jobs import lost_job_line

        line = lost_job_line(exc)
        if line is None or full_error:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
