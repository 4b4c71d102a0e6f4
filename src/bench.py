"""Speed benchmark: training steps per precision against the machine's matmul limits, the input
pipeline's feed ratio, tiled upscaling, and an optional PyTorch peer. See ``srgan/bench/``.

    python src/bench.py [--quick] [--target-config] [--only steps,pipeline,upscale,torch,quality]

Prints a table and writes reports/bench.json (atomically); `--help` lists every option.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from srgan import cli  # noqa: E402 - after the log-level default
from srgan.bench import cli as bench_cli  # noqa: E402

if __name__ == "__main__":
    # exit 1 if any measurement failed (the report, with the error, is still written)
    cli.run_main(lambda: sys.exit(1 if bench_cli.main()["summary"]["errors"] else 0), expected=(ValueError,))
