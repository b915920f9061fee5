"""Entrypoint for `ray job submit`: tune the σ of an AXIS merge on the job's cluster.

    ray job submit --working-dir . -- python -m pipelines.tune tune.yaml
"""

from __future__ import annotations

import sys

from raymerge.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
