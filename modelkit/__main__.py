"""python -m modelkit prepare [NAME ...] | verify [NAME ...] | path NAME | list"""

from __future__ import annotations

import argparse
import shutil
import sys

from modelkit import ARTIFACTS, MODELS, is_ready, path, prepare, verify


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modelkit", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build models (all when none named)")
    p.add_argument("names", nargs="*")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    v = sub.add_parser("verify", help="re-check sha256 of built models")
    v.add_argument("names", nargs="*")
    w = sub.add_parser("path", help="print where a model is")
    w.add_argument("name")
    sub.add_parser("list", help="list the models and whether they are built")
    args = ap.parse_args(argv)
    names = getattr(args, "names", None) or list(ARTIFACTS)
    unknown = [n for n in names if n not in ARTIFACTS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(ARTIFACTS)}")
    if args.cmd == "prepare":
        for n in names:
            if args.force:
                shutil.rmtree(MODELS / n, ignore_errors=True)
            print(prepare(n))
    elif args.cmd == "verify":
        for n in names:
            verify(n)
            print(f"{n}: ok")
    elif args.cmd == "path":
        print(path(args.name))
    else:
        for n, a in ARTIFACTS.items():
            print(f"{n:16} {'built' if is_ready(n) else '-':6} {a.about}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
