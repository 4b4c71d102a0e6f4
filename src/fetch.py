"""Fetch stage: params ``data.source`` -> data/raw/{train,valid}/ and data/raw/fetch.json."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from srgan import config
from srgan.download import FetchError
from srgan.sources import fetch


def main(argv: list[str] | None = None) -> int:
    """Run the fetch stage; expected failures print one line and return non-zero."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=Path, default=config.PARAMS_PATH, help="default: params.yaml")
    ap.add_argument("--raw-dir", type=Path, default=config.ROOT / "data" / "raw")
    ap.add_argument("--download-dir", type=Path, default=config.ROOT / "data" / "downloads")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fetch: %(message)s")
    try:
        cfg = config.load(args.params)
        args.download_dir.mkdir(parents=True, exist_ok=True)  # a declared out, even when unused
        fetch(cfg, args.raw_dir, args.download_dir)
    except (config.ConfigError, FetchError, OSError) as exc:
        print(f"fetch: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch: interrupted; partial downloads are kept and resumed by the next run", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
