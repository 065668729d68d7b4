"""A short soak (tests/soak.py) in make test: the long one is `make soak`."""

from __future__ import annotations

import pytest

from tests.soak import Soak

pytestmark = pytest.mark.slow

SOAK_S = 15.0  # per mode: two modes within the 30 s


@pytest.mark.parametrize(
    ("trigger", "io"),
    [
        ("level", "copy"),
        pytest.param(
            "edge",
            "splice",
            marks=pytest.mark.xfail(
                reason="daemon bug: in edge mode a splice connection stops reading when a "
                "splice() returns short because the pipe ran out of slots (small segments), "
                "and never closes after its peer leaves; remove this mark once fixed",
                strict=True,
            ),
        ),
    ],
)
def test_short_soak_has_no_errors_and_returns_descriptors(trigger: str, io: str) -> None:
    """15 s of mixed traffic with reloads (one broken config) and SIGUSR1: every byte comes
    back, the broken config is rejected, and the daemon's descriptors return to baseline."""
    lines: list[str] = []
    result = Soak(
        SOAK_S, trigger=trigger, io=io, stall_s=10.0, drain_s=10.0, report=lines.append
    ).run()
    summary = "\n".join(lines + result.summary())
    assert result.error_count == 0, summary
    assert result.fd_after == result.fd_baseline, summary
    assert result.reloads_applied >= 1, summary
    assert result.reloads_rejected >= 1, summary
    assert result.stats_answered >= 1, summary
    assert result.passed, summary
