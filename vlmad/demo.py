"""``make demo``: the project's comparison on generated data with the random-weights tiny backbone.

Generates a synthetic MVTec-format target and a synthetic VisA-format auxiliary set, then runs WinCLIP
zero-shot and 1-shot and AnomalyCLIP (prompts learned on the auxiliary set, tested zero-shot on the target)
through the comparison driver (`experiment=demo`, `vlmad.engine.compare`), and prints the per-method tables and a
side-by-side summary. Random weights: the numbers show that the pipeline runs end to end, not how good any
method is.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

from vlmad.config import compose


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Run the demo; returns {member label: per-category metrics}."""
    from vlmad.config import fresh_dir
    from vlmad.engine.compare import run
    from vlmad.logs import quiet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the synthetic trees are generated")
    parser.add_argument("--out", default=None, help="output folder (default: a fresh outputs/demo/<time>)")
    parser.add_argument("--epochs", type=int, default=5, help="AnomalyCLIP epochs on the auxiliary set")
    args = parser.parse_args(argv)
    quiet()
    out = Path(args.out or fresh_dir(f"outputs/demo/{datetime.now():%Y-%m-%d_%H-%M-%S}"))
    start = time.perf_counter()
    overrides = ["experiment=demo", f"paths.data_dir={Path(args.data_dir).resolve()}"]
    _, objects = run(compose("train", [*overrides, f"trainer.max_epochs={args.epochs}"], out))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; outputs in {out}")
    return objects["members"]


if __name__ == "__main__":
    main()
