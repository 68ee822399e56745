"""finetune-ablation: measure, don't guess, what fine-tuning a Keras image base really does.

Three applications share one run record:

- ``cli`` (``ablate``) and ``run/``: one job = one two-phase fine-tuning run recorded as one MLflow run;
  a multirun groups its runs under an MLflow parent (``run.parent_run``).
- ``report/`` (``ablate-report``): a study's runs compared with error bars.
- ``reproduce/`` (``ablate-reproduce``): a logged run run again and compared epoch by epoch.

Shared by all three: ``record`` (every name of the run record), ``config`` (the schema and each key's
role), ``tracking``/``store``/``runstore`` (MLflow plumbing), ``liveness``/``reaper`` (runs whose process
died), ``console``, ``paths``, ``errors``, ``fingerprints``. ``sweeper_api`` is the Optuna plugin's one
door into the app; ``pretrain``/``demo_data``/``bases`` make the offline demo."""

__version__ = "0.1.0"
