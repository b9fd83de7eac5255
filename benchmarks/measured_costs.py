"""The measured recovery costs the goodput simulator reads (moe_parallel/goodput/costs.py).

Benchmarks that measure a cost the simulator needs (process start-up after a restart, the
blocking share of an async save) record their figures here, one section per benchmark, with
the command and the time of the measurement, so that the simulator's inputs are reproducible.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

MEASURED_COSTS = Path(__file__).resolve().parent / "results" / "recovery_costs.json"


def record_figures(benchmark: str, figures: dict[str, float], note: str = "") -> Path:
    """Replace ``benchmark``'s section of the results file with ``figures``."""
    data = json.loads(MEASURED_COSTS.read_text()) if MEASURED_COSTS.is_file() else {}
    data[benchmark] = {
        **figures,
        "command": " ".join(["python", *sys.argv]),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": note or "measured by the command above",
    }
    MEASURED_COSTS.parent.mkdir(parents=True, exist_ok=True)
    MEASURED_COSTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return MEASURED_COSTS
