"""Shared fixtures: generated 32x32 image folders, a temp MLflow store and a PostgreSQL server (used by
the engine and SLURM tests). Plain helpers (the fast settings, composing the config, running ``ablate``)
are in ``tests/helpers.py``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from finetune_ablation.demo_data import write_image_folder

from . import servers
from .helpers import new_store, require_module


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """Two classes x 20 PNGs of 32x32, written once per session; copy it before changing it."""
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, image_size=32, per_class=20, seed=0)
    return root


@pytest.fixture
def own_image_dir(image_dir, tmp_path) -> Path:
    """A private copy of the image folder, for tests that break it."""
    target = tmp_path / "images"
    shutil.copytree(image_dir, target)
    return target


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return new_store(tmp_path)


@pytest.fixture
def postgres() -> servers.Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1 (tests/servers.py); skips, saying why, without one."""
    require_module("psycopg", "pip install -e '.[engines]'")
    try:
        servers.require_postgres()
    except servers.ServerUnavailable as exc:
        pytest.skip(str(exc))
    with servers.postgres_server() as pg:
        yield pg
