"""``python -m musicflamingo.data.synthetic --out data/synthetic --n-train 400 --n-val 50 --n-test 50``."""

from __future__ import annotations

import argparse
import json
import sys

from musicflamingo.data.synthetic.build import CorpusConfigError, build_corpus
from musicflamingo.data.synthetic.render import SynthesizerNotFoundError


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m musicflamingo.data.synthetic", description=__doc__)
    p.add_argument("--out", default="data/synthetic", help="output folder (default: data/synthetic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--clip-seconds", type=float, nargs=2, default=(4.0, 15.0), metavar=("MIN", "MAX"))
    p.add_argument("--sampling-rate", type=int, default=16000)
    p.add_argument("--render-rate", type=int, default=32000, help="FluidSynth rate before resampling")
    p.add_argument(
        "--chorale-fraction", type=float, default=0.25, help="share of clips cut from Bach chorales"
    )
    p.add_argument("--clips-per-chorale", type=int, default=4)
    p.add_argument("--soundfont", default="/usr/share/sounds/sf2/FluidR3_GM.sf2")
    p.add_argument("--workers", type=int, default=2, help="concurrent fluidsynth processes")
    p.add_argument("--overwrite", action="store_true", help="replace a corpus built with another config")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        info = _build(a)
    except (CorpusConfigError, SynthesizerNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({s: str(p) for s, p in info.manifests.items()} | {"corpus": str(info.corpus_json)}))


def _build(a: argparse.Namespace):
    return build_corpus(
        a.out,
        seed=a.seed,
        n_train=a.n_train,
        n_val=a.n_val,
        n_test=a.n_test,
        clip_seconds=tuple(a.clip_seconds),
        sampling_rate=a.sampling_rate,
        render_rate=a.render_rate,
        chorale_fraction=a.chorale_fraction,
        clips_per_chorale=a.clips_per_chorale,
        soundfont=a.soundfont,
        workers=a.workers,
        overwrite=a.overwrite,
        progress=not a.quiet,
    )


if __name__ == "__main__":
    main()
