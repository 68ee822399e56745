"""The run record's one home (record.py) and the key classes in the schema (config.Role): pure checks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from finetune_ablation import record as rec
from finetune_ablation.config import PHASE2, Config, ModelConfig, Role, TrainConfig, replicate_keys, role_of
from finetune_ablation.run.phase1_cache import phase1_key
from finetune_ablation.tracking import config_hash


@dataclass
class PoolingModel(ModelConfig):
    pooling: str = "avg"  # a field added tomorrow, declared nowhere else


@dataclass
class PoolingSchema(Config):
    model: PoolingModel = field(default_factory=PoolingModel)


@dataclass
class WarmupTrain(TrainConfig):
    warmup_epochs: int = field(default=0, metadata=PHASE2)  # declared as phase 2 only


@dataclass
class WarmupSchema(Config):
    train: WarmupTrain = field(default_factory=WarmupTrain)


def _cfg(schema: type, **overrides):
    cfg = OmegaConf.structured(schema)
    cfg.model.weights = None  # no weights file to hash
    for dotted, value in overrides.items():
        OmegaConf.update(cfg, dotted, value)
    return cfg


def test_a_new_schema_field_enters_the_phase1_key_by_default():
    avg = phase1_key(_cfg(PoolingSchema, **{"model.pooling": "avg"}), "images")
    pooled = phase1_key(_cfg(PoolingSchema, **{"model.pooling": "max"}), "images")
    assert avg != pooled
    assert role_of("model.pooling", PoolingSchema) is Role.phase1


def test_a_phase2_field_stays_out_of_the_phase1_key_but_not_the_config_hash():
    a, b = _cfg(WarmupSchema), _cfg(WarmupSchema, **{"train.warmup_epochs": 3})
    assert phase1_key(a, "images") == phase1_key(b, "images")
    assert config_hash(a) != config_hash(b)


def test_phase1_key_follows_phase1_settings_only():
    base = phase1_key(_cfg(Config), "images")
    # threads: the count changes the bits, and a cached phase 1 must hold the bits the run computes
    changed = [("model.dropout", 0.5), ("train.base_lr", 0.01), ("augment.zoom", 0.1), ("seed", 1), ("threads", 1)]
    for dotted, value in changed:
        assert phase1_key(_cfg(Config, **{dotted: value}), "images") != base, dotted
    for dotted, value in [("model.fine_tune_at", 10), ("train.fine_tune_lr", 0.5), ("cache.dir", "/x"),
                          ("tracking.run_name", "x"), ("train.verbose", 2), ("data.dir", "/elsewhere")]:  # fmt: skip
        assert phase1_key(_cfg(Config, **{dotted: value}), "images") == base, dotted
    assert phase1_key(_cfg(Config), "other images") != base


def test_config_hash_leaves_out_exactly_the_recording_and_display_keys():
    """By hand: the keys the config hash has always left out, and the memory budgets and scratch keys added
    since (memory or disk hold the same bits), so existing resume keys stay valid."""
    cfg = _cfg(Config, **{"model.fine_tune_at": 7, "threads": 2})
    kept = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for group, key in [(None, "tracking"), (None, "optuna"), (None, "resume"), (None, "threads"),
                       ("cache", "dir"), ("cache", "phase1"), ("train", "verbose"),
                       ("cache", "pixels_memory_mib"), ("cache", "frozen_inputs_memory_mib"),
                       ("cache", "scratch_dir"), ("cache", "scratch_keep_free_mib")]:  # fmt: skip
        (kept[group] if group else kept).pop(key)
    expected = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert config_hash(cfg) == expected


def test_seeds_are_the_replicates():
    assert replicate_keys() == ("seed", "data.seed")


@pytest.mark.parametrize(
    ("tag", "values"),
    [
        ("model.dropout=0.5 +augment=strong", {"model.dropout": "0.5", "augment": "strong"}),
        ("'data.dir=/a b' ~tracking.uri ++seed=3", {"data.dir": "/a b", "seed": "3"}),
        ("model.name='unbalanced", {"model.name": "'unbalanced"}),  # broken quoting: split on spaces
    ],
)
def test_the_logged_overrides_parse_one_way(tag, values):
    assert rec.override_values(tag) == values


def test_the_overrides_tag_round_trips():
    overrides = ["model.dropout=0.5", "augment=strong"]
    assert rec.parse_overrides(rec.format_overrides(overrides)) == overrides


@pytest.mark.slow
def test_the_record_module_imports_no_tensorflow_or_mlflow():
    code = "import sys, finetune_ablation.record; print(sorted({'tensorflow', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
