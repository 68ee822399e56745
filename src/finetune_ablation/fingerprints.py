"""Content hashes that decide whether a result may be reused (the phase-1 cache, resume) or trusted (a
cache entry, the shipped demo base, the images): one definition of each, shared by all of them."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def installed(dist: str) -> tuple[str, str] | None:
    """(name, version) of the installed distribution ``dist``, or of the one that provides the module of that
    name in its place (``keras-nightly`` provides ``keras``: docs/stack-facts.md V1); None if neither is."""
    try:
        return dist, metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
    for other in metadata.packages_distributions().get(dist.replace("-", "_"), []):
        try:
            return other, metadata.version(other)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions(dists: tuple[str, ...]) -> dict[str, str]:
    """Each distribution's installed version (``installed``), or ``not installed``."""
    return {dist: found[1] if (found := installed(dist)) else "not installed" for dist in dists}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (image folders and weights files can be large)."""
    digest = hashlib.sha256()
    with Path(path).expanduser().open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_sha256() -> str:
    """The suite's own source (every module of the package, subpackages included): results computed by
    other code are not reused, while a commit that changes only docs reuses them."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def weights_file(weights: str | None) -> Path | None:
    """The local file behind ``model.weights`` (``demo``: the base shipped with the package), or None for
    ``imagenet`` and ``null``, whose identity is their name."""
    if weights in (None, "imagenet"):
        return None
    if weights == "demo":
        from .demo_base import demo_weights_path

        return Path(demo_weights_path())
    return Path(weights).expanduser()
