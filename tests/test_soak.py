"""A short soak (tests/soak.py) in make test: the long one is `make soak`."""

from __future__ import annotations

import pytest

from tests.soak import Soak
from tests.soak_traffic import PERIOD, SoakError, Stream, Tally

pytestmark = pytest.mark.slow

SOAK_S = 16.0  # per mode: reloads at 5, 10 and 15 s: B, broken, then A on top of B


# Both trigger modes, and splice in edge mode (where a short splice once stalled).
@pytest.mark.parametrize(
    ("trigger", "io"),
    [("level", "copy"), ("edge", "copy"), ("edge", "splice")],
)
def test_short_soak_has_no_errors_and_returns_descriptors(trigger: str, io: str) -> None:
    """16 s of mixed traffic with reloads (one broken config) and SIGUSR1: every byte comes
    back, the broken config is rejected, and the daemon's descriptors return to baseline."""
    lines: list[str] = []
    result = Soak(
        SOAK_S, trigger=trigger, io=io, stall_s=10.0, drain_s=10.0, report=lines.append
    ).run()
    summary = "\n".join(lines + result.summary())
    assert result.error_count == 0, summary
    assert result.fd_after == result.fd_baseline, summary
    assert result.reloads_applied >= 2, summary
    assert result.reloads_rejected >= 1, summary
    assert result.stats_answered >= 1, summary
    assert result.passed, summary


def test_stream_check_catches_wrong_missing_and_extra_bytes() -> None:
    """The soak's verifier accepts the exact echo in any chunking and rejects a changed
    byte, a skipped byte and bytes that were never sent."""
    tally = Tally()
    block = (bytes(range(251)) * (PERIOD // 251 + 1))[:PERIOD]  # no two neighbours equal
    doubled = memoryview(block * 2)

    def sent(n: int) -> tuple[Stream, bytes]:
        stream = Stream(doubled, start=PERIOD - 10, tally=tally)  # wraps around the block
        data = bytes(stream.next_chunk(n))
        stream.sent = n
        return stream, data

    good, echo = sent(30)
    good.check(echo[:7])
    good.check(echo[7:])
    assert (good.echoed, tally.verified) == (30, 30)
    changed = bytearray(echo)
    changed[12] ^= 1
    with pytest.raises(SoakError, match="differs at byte 12"):
        sent(30)[0].check(bytes(changed))
    with pytest.raises(SoakError, match="differs at byte 3"):
        sent(30)[0].check(echo[:3] + echo[4:])
    with pytest.raises(SoakError, match="31 bytes echoed but only 30 sent"):
        sent(30)[0].check(echo + b"x")
