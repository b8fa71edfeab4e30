"""`python -m robust_train explore --ckpt A.ckpt [--compare B.ckpt]`: a local page to watch an attack work on one
image (AdVis.js's loop: drag ε, see scores and maps follow) and what it changes inside the model (Bluff's view)."""
from __future__ import annotations

import argparse
import math
import sys

from robust_train.errors import ConfigError

INSTALL = 'the explorer is an optional extra: pip install -e ".[explore]" (or pip install "robust-train[explore]")'


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robust-train explore", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="the checkpoint to attack (white-box), written by fit")
    p.add_argument("--compare", default=None, metavar="CKPT",
                   help="a second checkpoint shown the same adversarial images (transfer: black-box on it)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="pick images from this ImageFolder (a subfolder per class) instead of the checkpoint's "
                        "own test set")
    p.add_argument("--n", type=int, default=200, help="images in the picker and in the channel statistics "
                                                      "(default 200)")
    p.add_argument("--data-root", default=None, help="where the checkpoint's test set lives, if not where it "
                                                     "was trained")
    p.add_argument("--eps-max", type=float, default=None,
                   help="the slider's largest L∞ ε (default: the largest of the data set's grid)")
    p.add_argument("--points", type=int, default=21, help="ε values on the slider (default 21)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when there is one)")
    return p


def check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a port: use 1–65535, or 0 for a free one")
    if args.n < 1:
        raise ConfigError(f"--n {args.n} must be at least 1")
    if not 2 <= args.points <= 101:
        raise ConfigError(f"--points {args.points} must be between 2 and 101")
    if args.eps_max is not None and not (math.isfinite(args.eps_max) and 0 < args.eps_max <= 1):
        raise ConfigError(f"--eps-max {args.eps_max} must be in (0, 1] (images live in [0, 1])")


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check(args)
    try:
        from werkzeug.serving import make_server

        from robust_train.explore.server import create_app
    except ImportError:
        raise ConfigError(INSTALL) from None
    from robust_train.checkpoint import read_checkpoint
    from robust_train.explore.session import Explorer

    for path in filter(None, (args.ckpt, args.compare)):
        read_checkpoint(path)  # refuse a bad checkpoint in one line before reading any data
    explorer = Explorer(args.ckpt, args.compare, args.images, args.n, args.data_root, args.device, args.eps_max,
                        args.points, progress=sys.stderr.isatty(), log=lambda m: print(m, file=sys.stderr))
    try:
        server = make_server(args.host, args.port, create_app(explorer), threaded=True)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}): pick another --port, "
                          "or 0 for a free one") from None
    host = f"[{args.host}]" if ":" in args.host else args.host
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"explore: serving on {args.host}, beyond this machine: anyone who can reach it can use the page "
              "(and make this machine compute)", file=sys.stderr)
    print(f"robust_train explore: http://{host}:{server.server_port}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
