"""One frame of an annotated movie (``OUT/<series>_movie.mp4`` of `ceriakeras analyze`) as a PNG.

    python scripts/tools/movie_frame.py results/demo/ceria_particle_2_movie.mp4 --frame 1 --out frame.png

The README's picture was made this way from `make demo`'s results (an example series, the
shipped model): ``ceria_particle_2_movie.mp4 --frame 1 --colors 64 --out docs/img/movie_frame.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ceriakeras.io.files import atomic_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("movie", type=Path, help="an MP4 written by `ceriakeras analyze`")
    ap.add_argument("--frame", type=int, default=0, help="which movie frame (0-based)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--colors", type=int, default=0,
                    help="palette size of the PNG (colours; 0 = full RGB): small files for docs")
    args = ap.parse_args(argv)
    import av

    with av.open(str(args.movie)) as container:
        for k, frame in enumerate(container.decode(video=0)):
            if k == args.frame:
                image = frame.to_image()
                if args.colors:
                    image = image.quantize(args.colors)
                with atomic_path(args.out) as tmp:
                    image.save(tmp, format="PNG", optimize=True)
                print(f"wrote {args.out} ({frame.width} × {frame.height} px)")
                return 0
    print(f"error: {args.movie} has only {k + 1} frames", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
