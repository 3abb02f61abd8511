"""Run by tests/tests/python.rs with --junitxml: one test of each verdict,
so the two reports can be compared (pytest exits 1: one fails on purpose)."""

import pytest

SOLO = dict(name="verdicts", box=None)


@pytest.mark.topology(**SOLO)
def test_passes(box):
    assert box.run(["true"]).succeeded


@pytest.mark.topology(**SOLO)
def test_fails_on_purpose(box):
    r = box.run(["sh", "-c", "exit 3"], check=False)
    assert r.rc == 0, "this one fails on purpose"


@pytest.mark.topology(**SOLO)
def test_is_skipped(box):
    pytest.skip("skipped on purpose")


@pytest.mark.topology(**SOLO)
@pytest.mark.parametrize("n", [1, 2])
def test_parametrized(box, n):
    assert box.run(["echo", str(n)]).stdout == f"{n}\n"


@pytest.mark.topology(name="impossible", box="no-such-capability")
def test_an_unsatisfiable_claim_is_an_error(box):
    pass
