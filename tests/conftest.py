"""Shared pytest configuration: Hypothesis profiles and the qemu-img fixtures."""

import os

from hypothesis import HealthCheck, settings

# ci: bounded and derandomized (the same examples on every run, so that CI's verdict is the
# code's, not the draw's); exploration is for "deep" and for runs by hand with --hypothesis-seed
settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "deep", max_examples=5000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# --- range map implementations (added by the range-map test helper) -------------------------
import importlib  # noqa: E402

import pytest  # noqa: E402

RANGEMAP_IMPLEMENTATIONS = {"c-extension": "qcow2._overlap", "pure-python": "qcow2._overlap_py"}


def rangemap_module(impl: str):
    """Import the module of one RangeMap implementation ("c-extension" or "pure-python").

    A missing C extension fails the test when CI=true or QCOW2_REQUIRE_EXTENSIONS=1, and skips
    it otherwise; the pure-Python twin must always import.
    """
    name = RANGEMAP_IMPLEMENTATIONS[impl]
    if impl == "pure-python":
        return importlib.import_module(name)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        strict = (os.environ.get("CI", "").lower() in ("1", "true", "yes")
                  or os.environ.get("QCOW2_REQUIRE_EXTENSIONS") == "1")
        if strict:
            pytest.fail(f"C extension {name} is not built: {exc}")
        pytest.skip(f"C extension {name} is not built: {exc}")


@pytest.fixture(scope="session", params=list(RANGEMAP_IMPLEMENTATIONS))
def rangemap_cls(request):
    """The RangeMap class of each implementation (ids "c-extension" and "pure-python")."""
    return rangemap_module(request.param).RangeMap
