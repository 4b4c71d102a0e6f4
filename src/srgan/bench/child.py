"""One measurement in a fresh process: ``python -m srgan.bench.child``, a JSON spec on stdin.

The spec's ``job`` names a module of this package whose ``run(spec)`` returns a dict: it is
printed as JSON on the last stdout line (logs go to stderr).
"""

import importlib
import json
import os
import sys

JOBS = ("steps", "pipeline", "upscale", "quality", "torch_peer")

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    spec = json.loads(sys.stdin.read())
    if spec.get("job") not in JOBS:
        sys.exit(f"unknown job {spec.get('job')!r}; jobs: {', '.join(JOBS)}")
    print(json.dumps(importlib.import_module(f"srgan.bench.{spec['job']}").run(spec)), flush=True)
