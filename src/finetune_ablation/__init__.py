"""finetune-ablation: measure, don't guess, what fine-tuning a Keras image base really does.

Three applications share one run record:

- ``cli`` (``ablate``) and ``run/``: one job = one two-phase fine-tuning run recorded as one MLflow run;
  a multirun groups its runs under an MLflow parent (``run.parent_run``).
- ``report/`` (``ablate-report``): a study's runs compared with error bars.
- ``reproduce/`` (``ablate-reproduce``): a logged run run again and compared epoch by epoch.

``gap/`` is the measurement itself, for any Keras model: ``ablate`` uses it through the same public
``GapCallback`` a notebook uses (it imports neither Hydra nor MLflow).

Shared by all three: ``record`` (every name of the run record), ``config`` (the schema and each key's
role), ``tracking``/``store``/``runstore`` (MLflow plumbing), ``liveness``/``reaper`` (runs whose process
died), ``console``, ``paths``, ``errors``, ``fingerprints``. ``sweeper_api`` is the Optuna plugin's one
door into the app; ``pretrain``/``demo_data`` make the offline demo, ``demo_base``/``bases`` ship it."""

__version__ = "0.1.0"
