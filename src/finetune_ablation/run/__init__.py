"""What one ``ablate`` job does (the Hydra app's entry point is ``finetune_ablation.cli``): its lifecycle as
one MLflow run (``job``), then config -> data -> model -> phase 1 -> phase 2 -> record (``train``),
reporting to a ``recorder``; the image folder (``data``; which files count, without TensorFlow:
``image_files``; the decoded pixels and frozen inputs in memory or on local disk: ``kept_rows``; the splits
as MLflow datasets: ``split_datasets``), augmentation and the classifier (``augment``, ``model``; the gap
measurement is the package ``gap``), the phase-1 cache and frozen inputs, computed once or every epoch
(``phase1_cache``, ``feature_cache``), the per-run figures (``plots``), a multirun grouped under one MLflow
parent run (``parent_run``), which job resume skips (``resume``) and the Optuna side of a job
(``optuna_trial``; its Keras callback, ``trial_reporter``)."""
