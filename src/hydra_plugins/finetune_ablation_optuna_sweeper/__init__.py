"""The finetune-ablation suite's Hydra sweeper on current Optuna (``hydra/sweeper=optuna``).

Why not the PyPI ``hydra-optuna-sweeper``: it pins ``optuna<3`` (whose RDB storage crashes on current
SQLAlchemy), its jobs never see their trial (no pruning) and its ``n_trials`` counts per launch. This one
accepts the same ``hydra.sweeper.params`` grammar, counts ``n_trials`` in the storage (a relaunch only
runs the missing trials; workers sharing a storage stop together) and hands each job its trial so the
job can report and be pruned (``finetune_ablation.run.trial_reporter``).

Hydra imports every public module of this package when it scans for plugins, so only ``config`` and
the light ``handoff`` live at the top; the sweep itself is in ``_impl`` and is imported on use. The
scanner runs those modules before registering them in ``sys.modules``, which dataclasses declared under
``from __future__ import annotations`` do not survive: ``config`` and ``handoff`` keep plain annotations.
"""
