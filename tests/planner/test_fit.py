"""The fitted constants are what kvstrata.planner.fit finds on the rows they claim, and only those rows."""

from __future__ import annotations

import pytest

from kvstrata.planner import fit
from kvstrata.planner.validation import load_rows


def test_stored_constants_are_the_refitted_ones():
    stored, refitted = fit.stored(), fit.refit()
    for name in stored:
        assert refitted[name] == pytest.approx(stored[name], rel=0.01), name


def test_fitted_rows_are_exactly_the_rows_constants_come_from():
    rows = load_rows()["rows"]
    fitted = {r["id"] for r in rows if r.get("fitted")}
    assert fitted == {f.row for f in fit.FITS}
    assert len(fitted) <= len(rows) / 3
