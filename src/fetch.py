"""Fetch stage: params ``data.*`` -> data/raw/{train,valid}/ and data/raw/fetch.json.

    python src/fetch.py [--params params.yaml] [--raw data/raw]

Archives are cached, verified, in the repository's data/downloads/ (resumable; shared by every DVC
workspace of the repository, so queued experiments do not download again).
"""

from srgan import cli
from srgan.config import Config, shared_root
from srgan.download import FetchError


def main(cfg: Config, args) -> None:
    from srgan.sources import fetch

    fetch(cfg, args.raw, shared_root() / "data" / "downloads")


if __name__ == "__main__":
    cli.stage(main, __doc__, {"raw": "data/raw"}, expected=(FetchError, OSError))
