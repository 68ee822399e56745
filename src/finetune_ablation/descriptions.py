"""The descriptions MLflow shows first: a run's finding, a sweep's question, what an experiment holds.

MLflow renders the tag ``mlflow.note.content`` (``record.DESCRIPTION_TAG``) of a run or an experiment as
its description, in Markdown, at the top of the run's page. The suite writes there what the user came for
(docs/mlflow-ui.md): a run's gap summary with the validation interval (the at-chance warning first), a
sweep's question, replicate design and the ``ablate-report`` command (later the report's own summary), and
what an experiment holds. Pure string building, no TensorFlow."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from urllib.parse import quote

from . import record as rec
from .config import replicate_keys
from .paths import EXPERIMENTS_DIR

# ---------------------------------------------------------------------------------------------------
# Pieces


def artifact_image(run_id: str, path: str, alt: str) -> str:
    """A Markdown image of a run's artifact, as the MLflow UI serves it (``get-artifact``, relative to the
    UI's own address, so it works for ``mlflow ui`` and a tracking server alike)."""
    return f"![{alt}](get-artifact?path={quote(path)}&run_uuid={run_id})"


def _capped(markdown: str, more: str) -> str:
    """At most ``record.MAX_TAG_LENGTH`` characters, cut at a paragraph, saying where the rest is."""
    if len(markdown) <= rec.MAX_TAG_LENGTH:
        return markdown
    kept = markdown[: rec.MAX_TAG_LENGTH - len(more) - 10].rsplit("\n\n", 1)[0]
    return f"{kept}\n\n… {more}"


def study_question(name: str | None) -> str | None:
    """The header comment of ``experiments/NAME.yaml`` (its question, design and command) as Markdown:
    prose as paragraphs, indented command lines as a code block. None for an unknown name."""
    if not name or not re.fullmatch(r"[\w.-]+", name):
        return None
    path = EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    prose: list[str] = []
    commands: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if text.strip().startswith("@package"):
            continue
        if text.startswith("   "):  # an indented example command
            commands.append(text.strip())
        else:
            prose.append(text.strip())
    paragraph = re.sub(r"^Question:\s*", "", " ".join(p for p in prose if p))
    block = ["```", *commands, "```"] if commands else []
    return "\n".join([paragraph, "", *block]).strip() if paragraph or commands else None


# ---------------------------------------------------------------------------------------------------
# A run


def run_description(
    summary: str, val_accuracy: float, interval: tuple[float, float], val_count: int, majority: float
) -> str:
    """A run's description: ``gap_summary.txt`` (the at-chance warning, when there is one, stays first) and
    the final validation accuracy with its 95% interval. Lines of the summary that describe a phase become
    a list, its other lines paragraphs (the legend in italics). The first line is plain text: the runs
    table's Description column shows it raw."""
    low, high = interval
    interval_line = (
        f"val_accuracy {val_accuracy:.3f}, 95% interval {low:.3f}–{high:.3f} over {val_count} validation "
        f"images (majority-class rate {majority:.3f})"
    )
    lines = [line.strip() for line in summary.strip().splitlines() if line.strip()]
    out: list[str] = []
    if lines and lines[0].upper().startswith("AT CHANCE"):
        out += [lines.pop(0), ""]
    out += [interval_line, ""]
    phases = [line for line in lines if line.startswith("phase ")]
    out += [f"- {line}" for line in phases]
    out += [""] if phases else []
    for line in (line for line in lines if not line.startswith("phase ")):
        out += [f"_{line}_" if "=" in line else line, ""]
    return _capped("\n".join(out).strip(), f"the whole summary: artifact {rec.GAP_SUMMARY_TXT}")


def with_figures(markdown: str, run_id: str, figures: Sequence[str]) -> str:
    """A description followed by the run's figures (artifacts already logged), shown inline by the UI."""
    images = [artifact_image(run_id, name, name) for name in figures]
    return "\n\n".join([markdown, *images]) if images else markdown


# ---------------------------------------------------------------------------------------------------
# A sweep


def _listed(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "searched"


def design_line(varied: Mapping[str, list[str]], data_seed_follows_seed: bool) -> str:
    """What the sweep varies, and its replicates (which noise an interval over them covers)."""
    seeds = set(replicate_keys())
    factors = {k: v for k, v in varied.items() if k not in seeds}
    replicates = {k: v for k, v in varied.items() if k in seeds}
    sizes = [len(v) for v in varied.values()]
    grid = " × ".join(f"`{k}` ({_listed(v)})" for k, v in factors.items()) or "no factor"
    line = f"**Design**: {math.prod(sizes)} runs: {grid}" if sizes and all(sizes) else f"**Design**: {grid}"
    if not replicates:
        return (
            f"{line}. **No replicates**: one run per setting, so `ablate-report` can give no interval; add "
            "`seed=1,2,3` for error bars."
        )
    reps = ", ".join(f"`{k}` ({_listed(v)})" for k, v in replicates.items())
    split = (
        "the validation split follows the seed (`data.seed=${seed}`): intervals cover the choice of validation "
        "images too"
        if data_seed_follows_seed or "data.seed" in replicates
        else "on one fixed validation split (`data.seed`): intervals cover initialisation, dropout and "
        "augmentation, not the choice of validation images"
    )
    return f"{line}; **replicates** {reps}, {split}."


def sweep_description(study: str | None, command: str, design: str, parent_id: str) -> str:
    """A sweep parent's description until a report replaces it: question, design, how to get the answer. The
    first line is plain text (the runs table's Description column shows it raw)."""
    question = study_question(study)
    parts = [f"Study {study} (experiments/{study}.yaml): {question}" if question else "An ad-hoc sweep."]
    parts += [
        design,
        f"**Command**: `{command}`",
        f"**The answer with error bars**: `ablate-report --parent-run {parent_id}` writes the report and logs it "
        "here (artifacts `report/`); its summary then replaces this text. Each child run's description is its "
        "own finding.",
    ]
    return _capped("\n\n".join(parts), f"the whole command: tag {rec.SWEEP_COMMAND_TAG}")


def report_description(report_markdown: str, parent_id: str, report_dir: str = rec.REPORT_DIR) -> str:
    """The report's summary as a sweep parent's description: the report up to its second section (the
    counts, the replicate design and the gap's verdicts), its figures served from the parent's artifacts,
    its title as the plain first line."""
    kept: list[str] = []
    sections = 0
    for line in report_markdown.splitlines():
        if line.startswith("## "):
            sections += 1
            if sections == 2:
                break
        kept.append(line)
    text = re.sub(r"^# ", "", "\n".join(kept).strip())  # the title as plain text: the runs table shows it raw
    text = re.sub(
        r"!\[([^\]]*)\]\(([^)/:]+\.png)\)",
        lambda m: artifact_image(parent_id, f"{report_dir}/{m.group(2)}", m.group(1)),
        text,
    )
    # "[-8.4, +17.3] (n=4)" is an interval, not a link: Markdown renderers (MLflow's too) would make it one
    text = re.sub(r"(?<!!)\[([^\]]*)\](\s+\()", r"\\[\1\\]\2", text)
    more = f"the whole report: artifact {report_dir}/report.md"
    return _capped(f"{text}\n\n_The whole report: artifact `{report_dir}/report.md`._", more)


# ---------------------------------------------------------------------------------------------------
# An experiment


def experiment_description(name: str) -> str:
    """What an experiment holds, and how its runs are named."""
    question = study_question(name)
    lines = [
        f"**{name}**: runs of finetune-ablation, each a two-phase Keras fine-tuning (head on a frozen base, "
        "then the top of the base unfrozen) logged by `ablate`."
    ]
    if question:
        lines.append(f"**The study** (`experiments/{name}.yaml`): {question}")
    lines.append(
        "- A sweep (`ablate -m ...`) is a parent run named after its study and start time; its child runs are "
        "named after what each job varies.\n"
        "- A single run is named after its data folder and key settings; `reproduce <name>` is a reproduction.\n"
        "- A run's description is its finding: by how much validation beats training and why, with the "
        "validation interval. Its datasets are its training and validation splits."
    )
    return _capped("\n\n".join(lines), "see docs/mlflow-ui.md")
