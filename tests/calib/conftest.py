"""Fixtures of the calibration-engine tests."""

from __future__ import annotations

import pytest
from calib_fixtures import Setup


@pytest.fixture(scope="session")
def setup() -> Setup:
    return Setup()
