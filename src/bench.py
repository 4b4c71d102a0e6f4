"""Speed benchmark: training steps per precision against the machine's matmul limits, the input
pipeline's feed ratio, tiled upscaling, and an optional PyTorch peer. See ``srgan/bench/``.

    python src/bench.py [--quick] [--target-config] [--only steps,pipeline,upscale,torch,quality]

Prints a table and writes reports/bench.json (atomically); `--help` lists every option.
"""

import sys

from srgan import cli, quiet
from srgan.bench import cli as bench_cli

if __name__ == "__main__":
    quiet.quiet_native_startup()  # before TensorFlow is imported; --verbose, parsed later, undoes it
    # exit 1 if any measurement failed (the report, with the error, is still written)
    cli.run_main(lambda: sys.exit(1 if bench_cli.main()["summary"]["errors"] else 0), expected=(ValueError,))
