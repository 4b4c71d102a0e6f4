"""Speed benchmark: training steps, input pipeline, tiled upscaling vs the machine's matmul limit.

    python src/bench.py [--blocks N] [--filters F] [--batch B] [--patch P] [--target-config]
                        [--variants plain,onednn,xla:g_pretrain,bf16:g_pretrain] [--quick]
                        [--quality] [--only steps,pipeline,upscale,quality] [--out reports/bench.json]

Prints a table and writes reports/bench.json (atomically). Defaults come from params.yaml.
Every measurement runs in a fresh child process; see srgan/bench.py for the conventions.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from srgan import bench, cli  # noqa: E402 - after the log-level default

if __name__ == "__main__":
    # exit 1 if any measurement failed (the report, with the error, is still written)
    cli.run_main(lambda: sys.exit(1 if bench.main()["summary"]["errors"] else 0), expected=(ValueError,))
