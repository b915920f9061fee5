"""Entrypoint for `ray job submit`: merge a recipe on the job's cluster.

    ray job submit --working-dir . -- python -m pipelines.merge recipe.yaml [--out DIR]

Ends with one JSON line for a scheduler: {"status": "ok", "output", "base", "sources" (with
revisions), "seconds", "read_bytes", "output_bytes"}, or {"status": "error", "error"}; exit
status 0 only when the output is complete. The job's driver runs here; Ray tasks run on the
cluster's workers; the writer actor is pinned to this driver's node, so --out (or output.path)
must be writable on the node the job runs on.
"""

from __future__ import annotations

import sys

from raymerge.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:], "--no-progress", "--json"]))
