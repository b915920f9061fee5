"""Entrypoint for `ray job submit` (or a cron / RayCronJob): re-merge what changed.

    ray job submit --working-dir . -- python -m pipelines.regenerate registry.yaml

One JSON line per model ({"name", "status": merged | unchanged | running | error, "output",
"submission_id", "sources" with identities, times and bytes}), then one for the run
({"status": "ok" | "error", "failed", "models"}). Exit status 0 only when no model failed.
"""

from __future__ import annotations

import sys

from raymerge.cli import main

if __name__ == "__main__":
    sys.exit(main(["regenerate", *sys.argv[1:], "--json"]))
