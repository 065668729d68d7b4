"""The fault campaign: `python -m tests.chaos [--seconds S] [--only NAME ...] [--seed N]`.

`make chaos` runs it (CHAOS_S sets --seconds: the load phase of each restart scenario; the
others run a fifth of it, at least 30 s). It prints the table docs/reliability.md keeps and
exits 1 if any scenario broke a promise. Needs root (containers, namespaces, a tmpfs).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from tests.chaos.journal import full_log_file, sick_journal
from tests.chaos.kills import kills_mid_handoff
from tests.chaos.network import bad_network, syn_flood
from tests.chaos.outcome import Row, table
from tests.chaos.restarts import restarts_under_load
from tests.chaos.restore_kills import kills_while_restoring
from tests.chaos.slowpeers import slow_peers

# name -> (run(seconds, seed), share of --seconds)
SCENARIOS: dict[str, tuple[Callable[[float, int], Row], float]] = {
    "restarts": (lambda s, seed: restarts_under_load(s, seed, workers=1), 1.0),
    "restarts-workers": (lambda s, seed: restarts_under_load(s, seed, workers=2), 1.0),
    "kills": (kills_mid_handoff, 0.0),
    "kills-restore": (kills_while_restoring, 0.0),
    "journal": (sick_journal, 0.2),
    "log-file": (full_log_file, 0.2),
    "network": (lambda s, seed: bad_network(s, seed, "level"), 0.2),
    "network-edge": (lambda s, seed: bad_network(s, seed, "edge"), 0.2),
    "syn-flood": (syn_flood, 0.1),
    "slow-peers": (slow_peers, 0.2),
}
MIN_SECONDS = 30.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    args = parser.parse_args(argv)
    rows = []
    started = time.monotonic()
    for name in args.only or SCENARIOS:
        run, share = SCENARIOS[name]
        seconds = max(MIN_SECONDS, args.seconds * share)
        print(f"chaos: {name} for {seconds:g} s", flush=True)
        try:
            row = run(seconds, args.seed)
        except Exception as e:  # a scenario that crashes is a failed scenario, not the end
            row = Row(name, failures=[f"the scenario crashed: {e!r}"])
        rows.append(row)
        print(table([row]), flush=True)
    print(
        f"\nchaos: {len(rows)} scenarios in {(time.monotonic() - started) / 60:.1f} min, "
        f"--seconds {args.seconds:g}, --seed {args.seed}\n"
    )
    print(table(rows))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
