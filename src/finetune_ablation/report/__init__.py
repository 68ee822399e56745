"""``ablate-report``: compare the runs of a study with error bars. ``app`` reads the runs and writes
the report; ``stats`` holds the statistics, ``design`` what counts as one piece of evidence, ``text``
the wording and ``plots`` the per-study figures (docs/report.md)."""

from .app import main

__all__ = ["main"]
