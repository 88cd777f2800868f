"""The suite tests the checkout it was started from, in that checkout's own environment.

A stale install elsewhere (another clone's editable package on ``PYTHONPATH``, a user
site-packages, an old virtual environment) would let the suite pass on code other than the
code under test. These checks make such a run fail instead.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

import launch
import megatron_ext
import recipes

ROOT = Path(__file__).resolve().parents[2]


def test_project_packages_are_imported_from_this_checkout():
    for package in (megatron_ext, recipes, launch):
        origin = Path(package.__file__).resolve()
        assert origin.is_relative_to(ROOT), f"{package.__name__} imported from {origin}, not {ROOT}"


def test_no_user_site_packages_can_shadow_the_environment():
    # A virtual environment turns the user site off; with it on, packages installed by hand
    # outside the environment would be importable by the tests.
    if sys.prefix != sys.base_prefix:
        assert not site.ENABLE_USER_SITE


def test_make_test_runs_in_the_checkouts_own_venv():
    # `make test` exports MAKELEVEL; the interpreter must then be this checkout's .venv.
    if "MAKELEVEL" in os.environ:
        assert Path(sys.prefix).resolve() == (ROOT / ".venv").resolve(), sys.prefix
