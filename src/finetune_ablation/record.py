"""The run record: every name a run writes to MLflow and the report, sweep summary, resume, reproduce
and the reaper read back, defined once (docs/run-record.md lists them all).

Writers (the training's recorder, the CLI, the sweep callback, liveness, the Optuna plugin) and readers
import their names from here, so a renamed tag cannot leave a reader searching for the old one. The
module imports nothing heavy (no TensorFlow, no MLflow): the report and the plugin read it cheaply."""

from __future__ import annotations

import shlex

# ---------------------------------------------------------------------------------------------------
# Caps

MAX_PARAM_LENGTH = 500  # MLflow's cap on a param value
MAX_TAG_LENGTH = 5000  # what the suite keeps of a long tag value (errors, commands, overrides)
MAX_RUN_NAME_LENGTH = 250

# ---------------------------------------------------------------------------------------------------
# Tags every run carries from its start: identity (run/resume.py) and where it came from

CONFIG_HASH_TAG = "config_hash"  # tracking.config_hash: the config without recording-only keys
CODE_TAG = "code.sha256"  # a hash of the package's source
# MLflow's own tag for the commit of the code that ran: its runs table shows it as "Version"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_DIRTY_TAG = "git.dirty"
VERSION_TAG_PREFIX = "version."  # version.<distribution>
WEIGHTS_FILE_TAG = "model.weights_file_sha256"  # when model.weights is a file
HYDRA_OVERRIDES_TAG = "hydra.overrides"  # Hydra's task overrides, space-joined (parse_overrides reads it)
HYDRA_OUTPUT_DIR_TAG = "hydra.output_dir"
HYDRA_JOB_TAG = "hydra.job"
HYDRA_SWEEPER_TAG = "hydra.sweeper"  # on a sweep's parent
HYDRA_LAUNCHER_TAG = "hydra.launcher"  # on a sweep's parent
THREADS_GRANTED_TAG = "threads.granted_by"  # what decided the job's TF thread count (the param ``threads``)

# Tags the training writes
DATA_FINGERPRINT_TAG = "data.fingerprint"
CROSS_SPLIT_DUPLICATES_TAG = "data.cross_split_duplicates"
WARNING_TAG = "warning"
SAME_BASE_OBJECT_TAG = "answer.same_base_object"
# What the Keras that ran does with base(x, training=False) during fit, measured by gap.probe() at the
# run's start: "true"/"false" each, and the probe's sentence with its numbers
TRAINING_FALSE_KEEPS_BN_FROZEN_TAG = "answer.training_false_keeps_bn_frozen"
DROPOUT_AFTER_TRAINING_FALSE_TAG = "answer.dropout_after_training_false_active"
KERAS_PROBE_TAG = "answer.keras_probe"
WEIGHTS_DIGEST_TAG = "model.weights_sha256"  # every model variable hashed: bit-identity in one string
MODEL_URI_TAG = "model.uri"
PHASE1_CACHE_TAG = "phase1_cache"  # hit | miss | off
PHASE1_CACHE_KEY_TAG = "phase1_cache_key"
PHASE1_CACHE_WARNING_TAG = "phase1_cache_warning"  # a bad cache entry was removed and recomputed
AT_CHANCE_TAG = "gap.at_chance"  # true | false
TIMING_TAG_PREFIX = "timing."  # timing.<phase>_seconds
ERROR_TAG = "error"  # the suite's one tag for why a run did not finish
TRUE = "true"


def feature_cache_tag(phase: int) -> str:
    """Whether a phase trained on frozen inputs (once or per epoch): ``on: <which>`` | ``off`` | ``not used: <why>``."""
    return f"feature_cache.phase{phase}"


# Where a run kept what it computes once (run/kept_rows.py): ``memory|disk|recomputed: <why>``
DECODED_PIXELS_STORAGE_TAG = "storage.decoded_pixels"


def frozen_inputs_storage_tag(phase: int) -> str:
    """Where a phase kept its frozen inputs: ``memory|disk|recomputed: <why>`` (with ``feature_cache.phase<n>``)."""
    return f"storage.frozen_inputs.phase{phase}"


def timing_tag(phase: str) -> str:
    """Wall time of a phase (a tag, not a metric: timings differ between identical runs)."""
    return f"{TIMING_TAG_PREFIX}{phase}_seconds"


# Sweeps (sweep grouping, resume)
ROLE_TAG = "sweep.role"
PARENT_ROLE = "parent"  # the value of ROLE_TAG on a sweep's parent run
SWEEP_DIR_TAG = "sweep.dir"
SWEEP_COMMAND_TAG = "sweep.command"
REUSED_TAG = "sweep.last_reused_by"  # set on a FINISHED run that a later sweep skipped to
SWEEPER_LAUNCHED_TAG = "sweep.sweeper_launched"  # Optuna sweeper: trials it launched in this launch
SWEEPER_FAILED_TAG = "sweep.sweeper_failed"  # ... and counted as failed
SWEEP_COUNT_TAGS = {name: f"sweep.{name}" for name in ("jobs", "failed", "reused", "pruned")}
BEST_RUN_TAG = "sweep.best_run_id"

# Optuna trials and studies
PRUNED_TAG = "pruned"  # "true" on a trial the pruner stopped early
OPTUNA_STUDY_TAG = "optuna.study_name"
OPTUNA_TRIAL_TAG = "optuna.trial_number"
OPTUNA_PRUNED_AT_TAG = "optuna.pruned_at_epoch"
OPTUNA_REPORT_ERROR_TAG = "optuna.report_error"
OPTUNA_STORAGE_TAG = "optuna.storage"  # on a sweep's parent, with the study name
OPTUNA_BEST_TRIAL_TAG = "optuna.best_trial_number"
OPTUNA_BEST_RUN_TAG = "optuna.best_run_id"

# Reproductions (on the new run)
REPRODUCED_TAG = "reproduced_from"  # the original run's id
REPRODUCE_MATCH_TAG = "reproduce.match"  # true | false
REPRODUCE_TOLERANCE_TAG = "reproduce.tolerance"

# Liveness (liveness.py writes, reaper.py reads)
HOST_TAG = "liveness.host"
PID_NAMESPACE_TAG = "liveness.pid_namespace"
PID_TAG = "liveness.pid"
PROCESS_START_TAG = "liveness.process_start"  # the process's start time, seconds since the epoch
HEARTBEAT_TAG = "liveness.heartbeat"  # UTC, ISO 8601, refreshed every liveness.HEARTBEAT_INTERVAL_S
HEARTBEAT_INTERVAL_TAG = "liveness.heartbeat_interval_s"
SLURM_JOB_TAG = "liveness.slurm_job"  # the SLURM job running the process (``<array>_<task>`` for an array task)
SLURM_CLUSTER_TAG = "liveness.slurm_cluster"  # its cluster's ClusterName
REAPED_TAG = "liveness.reaped"  # why the run was marked KILLED
REAPED_BY_TAG = "liveness.reaped_by"  # which process marked it, and when

# MLflow's own
MLFLOW_PARENT_RUN_TAG = "mlflow.parentRunId"
MLFLOW_RUN_NAME_TAG = "mlflow.runName"
# A run's or an experiment's description, Markdown, shown first on its page (descriptions.py writes it)
DESCRIPTION_TAG = "mlflow.note.content"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # an experiment tag; MLflow 3.17's UI ignores it

# ---------------------------------------------------------------------------------------------------
# Params: the whole resolved config (tracking.config_params), plus these the training derives

DATA_COUNT_PARAM_PREFIX = "data.count."  # data.count.<split>.<class>
VAL_COUNT_PARAM_PREFIX = f"{DATA_COUNT_PARAM_PREFIX}val."
CLASS_NAMES_PARAM = "data.class_names"
FINE_TUNE_AT_INDEX_PARAM = "model.fine_tune_at_index"
FIRST_UNFROZEN_PARAM = "model.first_unfrozen_layer"
BASE_LAYERS_PARAM = "model.base_layers"  # how many layers the base has (154 for Keras 3's MobileNetV2)
DERIVED_PARAMS = (CLASS_NAMES_PARAM, FINE_TUNE_AT_INDEX_PARAM, FIRST_UNFROZEN_PARAM, BASE_LAYERS_PARAM)
OPTUNA_BEST_PARAM_PREFIX = "optuna.best."  # on a sweep's parent: the best trial's values

# ---------------------------------------------------------------------------------------------------
# Metrics (per epoch, step = the global epoch, unless said otherwise)

VAL_ACCURACY = "val_accuracy"
ACCURACY = "accuracy"
TRAIN_CLEAN_ACCURACY = "train_clean_accuracy"
LOSS = "loss"
VAL_LOSS = "val_loss"
LEARNING_RATE = "learning_rate"
GAP_PREFIX = "gap/"  # the gap in accuracy and its components
GAP_LOSS_PREFIX = "gap_loss/"  # the same in loss
GAP_TOTAL = f"{GAP_PREFIX}total"
# The telescoping gap components, in the order the measurement removes them (gap/decomposition.py COMPONENTS).
GAP_COMPONENTS = ("lag", "batchnorm", "dropout", "augmentation", "split")
VAL_MAJORITY_RATE = "val_majority_rate"  # once, at the end
BEST_VAL_ACCURACY = "best_val_accuracy"  # on a sweep's parent
OPTUNA_BEST_VALUE = "optuna.best_value"  # on a sweep's parent
OPTUNA_TRIALS_METRIC_PREFIX = "optuna.trials."  # optuna.trials.<state>: trial counts, on a sweep's parent
REPRODUCE_METRIC_PREFIX = "reproduce/"
REPRODUCE_DIFF_METRIC = f"{REPRODUCE_METRIC_PREFIX}max_abs_diff"  # on a reproduction
SYSTEM_METRIC_PREFIX = "system/"  # MLflow's system metrics (wall-clock: never compared)


def gap_metric(component: str) -> str:
    return f"{GAP_PREFIX}{component}"


def interval_metrics(accuracy: str) -> tuple[str, str]:
    """The bounds of an accuracy's 95% Wilson interval (``val_accuracy_ci_low``, ``val_accuracy_ci_high``)."""
    return f"{accuracy}_ci_low", f"{accuracy}_ci_high"


def phase_metric(phase: int, name: str) -> str:
    """A phase's summary metric (``phase2/trainable_params``), logged once."""
    return f"phase{phase}/{name}"


# What a study compares (report) and a sweep summarises: final values of each run.
STUDY_METRICS = (VAL_ACCURACY, ACCURACY, TRAIN_CLEAN_ACCURACY, GAP_TOTAL, *(gap_metric(c) for c in GAP_COMPONENTS))
CURVE_METRICS = (ACCURACY, VAL_ACCURACY, TRAIN_CLEAN_ACCURACY, LOSS, VAL_LOSS)

# ---------------------------------------------------------------------------------------------------
# Artifacts

HISTORY_CSV = "history.csv"
LEARNING_CURVES_PNG = "learning_curves.png"
GAP_PNG = "gap.png"
GAP_SUMMARY_TXT = "gap_summary.txt"
CONFIG_YAML = "config.yaml"
MODEL_ARTIFACT = "model"  # MLflow Keras flavor: runs:/<run id>/model
HYDRA_DIR = ".hydra"
HYDRA_OVERRIDES_YAML = f"{HYDRA_DIR}/overrides.yaml"
SWEEP_SUMMARY_CSV = "sweep_summary.csv"  # on a sweep's parent
OPTUNA_ARTIFACT_DIR = "optuna"  # the sweeper's results and plots, on a sweep's parent
REPORT_DIR = "report"  # ablate-report's files on a sweep's parent
REPRODUCE_COMPARISON_CSV = "reproduce_comparison.csv"  # on a reproduction


def trainable_report_artifact(phase: int) -> str:
    return f"trainable_weights_phase{phase}.txt"


# ---------------------------------------------------------------------------------------------------
# Datasets (MLflow's dataset API, ``mlflow.log_input``): each split of the data folder, by its context

DATASET_CONTEXT_TAG = "mlflow.data.context"  # MLflow's input tag saying what a dataset was used for
DATASET_CONTEXTS = {"train": "training", "val": "validation"}  # split -> its value of DATASET_CONTEXT_TAG
DATASET_DIGEST_LENGTH = 12  # hex digits of the split's fingerprint kept as the dataset digest (MLflow's cap: 36)


# ---------------------------------------------------------------------------------------------------
# The logged Hydra overrides: one writer, one parser


def format_overrides(overrides: list[str]) -> str:
    """The ``hydra.overrides`` tag: Hydra's task overrides, space-joined, capped."""
    return " ".join(overrides)[:MAX_TAG_LENGTH]


def parse_overrides(tag: str) -> list[str]:
    """The override tokens of a ``hydra.overrides`` tag (shell quoting honoured; split on spaces when
    the quoting is broken, e.g. by the cap)."""
    try:
        return shlex.split(tag)
    except ValueError:
        return tag.split()


def override_values(tag: str) -> dict[str, str]:
    """``key -> value`` of every override that sets a value (``+key=v`` and ``++key=v`` included;
    deletions ``~key`` set nothing and are left out)."""
    pairs = (token.split("=", 1) for token in parse_overrides(tag) if "=" in token and not token.startswith("~"))
    return {key.lstrip("+"): value for key, value in pairs}
