"""Evaluation-sets stage: the benchmark sets named in ``evaluate.sets`` (Set5, Set14, BSD100,
Urban100, Manga109, DIV2K valid) and, for ``evaluate.niqe: matlab``, NIQE's original pristine model.

    python src/evalsets.py [--params params.yaml] [--out data/benchmarks]

Writes data/benchmarks/<set>/{hr,lr}/*.png (HR mod-cropped, LR by the project's bicubic, as for
validation) and data/benchmarks/niqe/. Archives are cached, verified, in the repository's
data/downloads/. With the default ``evaluate.sets: [valid]`` nothing is downloaded (offline).
"""

import shutil

from srgan import cli
from srgan.config import Config, shared_root
from srgan.download import FetchError

NIQE_DIR = "niqe"  # the MATLAB NIQE model, read by the evaluate stage
SETS_JSON = "sets.json"


def main(cfg: Config, args) -> None:
    from srgan import benchmarks, dataio, niqe

    out, downloads = args.out, shared_root() / "data" / "downloads"
    names = [s for s in cfg.evaluate.sets if s != "valid"]
    fetched = benchmarks.fetch_benchmarks(names, out, downloads, cfg.preprocess.scale)
    keep = {*fetched, NIQE_DIR if cfg.evaluate.niqe == "matlab" else None, SETS_JSON}
    if out.is_dir():  # the folder holds exactly what params ask for: drop sets no longer listed
        for old in out.iterdir():
            if old.name not in keep:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    if cfg.evaluate.niqe == "matlab":
        model = niqe.load_model("matlab", cache_dir=downloads, download=True)  # verified download
        dst = out / NIQE_DIR / niqe.MATLAB_ARCHIVE.name
        if not dst.is_file() or dataio.sha256_file(dst) != niqe.MATLAB_ARCHIVE.sha256:
            # from wherever the verified model was found: the installed wheel or the download cache
            dataio.write_bytes_atomic(dst, model.source.read_bytes())
        print(f"NIQE: {model.label}")
    dataio.write_json_atomic(out / SETS_JSON, {"sets": sorted(fetched), "scale": cfg.preprocess.scale,
                                               "niqe": cfg.evaluate.niqe})
    print(f"evaluation sets: valid (data/processed) + {', '.join(fetched) or 'no benchmark set'} -> {out}")


if __name__ == "__main__":
    cli.stage(main, __doc__, {"out": "data/benchmarks"}, expected=(FetchError, OSError))
