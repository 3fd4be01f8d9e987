"""Request-rate sweep as a data table: each stage holds a target request rate for a while.

Use together with the user file (LT=$(python -m vllm_normswap.load_tests)):  locust -f "$LT/locustfile.py,$LT/rate_sweep.py" --headless \
    --per-user-rate 0.5 ...   (each user paces itself to --per-user-rate requests/s; this shape sets the number
of users to rate / per-user-rate, so the offered load is the table's rate whether one process or a master with
workers runs it: only the master runs a shape.) Override the table with NORMSWAP_RATE_TABLE=file.json holding
[[duration_s, requests_per_s], ...]. The stage boundaries go to stdout as JSON so the analysis can split records.
"""

from __future__ import annotations

import json
import math
import os

from locust import LoadTestShape

# (seconds at this stage, offered requests/s)
STAGES = [
    (20, 0.5),
    (20, 1.0),
    (20, 2.0),
    (20, 4.0),
]


def load_table() -> list[tuple[float, float]]:
    path = os.environ.get("NORMSWAP_RATE_TABLE")
    if not path:
        return list(STAGES)
    table = json.loads(open(path).read())
    if not table or any(len(row) != 2 or row[0] <= 0 or row[1] <= 0 for row in table):
        raise SystemExit(f"NORMSWAP_RATE_TABLE={path}: need [[duration_s > 0, rate > 0], ...]")
    return [(float(d), float(r)) for d, r in table]


class RateSweep(LoadTestShape):
    table = None  # read at the first tick (locust instantiates shapes while it imports the file)

    def tick(self):
        if self.table is None:
            self.table = load_table()
        per_user = self.runner.environment.parsed_options.per_user_rate
        if not per_user:
            raise SystemExit("rate_sweep.py needs --per-user-rate > 0 (users pace themselves; the shape sets users)")
        t, end = self.get_run_time(), 0.0
        for duration, rate in self.table:
            end += duration
            if t < end:
                users = max(1, math.ceil(rate / per_user))
                return users, users  # spawn all at once: the stage starts at its rate
        return None
