"""The test tiers: every test runs under a pytest-timeout, and the tier markers are registered."""

from __future__ import annotations

from ..conftest import EXPLICIT_TIMEOUT_MARKERS, TIMEOUT_PROBLEMS


def test_every_test_carries_a_timeout(request):
    config = request.config
    assert float(config.getini("timeout")) > 0, "set `timeout` in [tool.pytest.ini_options]"
    assert config.getini("timeout_method") == "signal", "thread would end the whole run on one hung test"
    problems = config.stash[TIMEOUT_PROBLEMS]
    assert not problems, "\n".join(problems)


def test_the_tier_markers_are_registered(request):
    config = request.config
    registered = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    assert set(EXPLICIT_TIMEOUT_MARKERS) | {"timeout"} <= registered
    assert "--strict-markers" in config.getini("addopts")
