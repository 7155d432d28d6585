#!/usr/bin/env python3
"""Replaces the README's block between `<!-- NAME -->` and `<!-- /NAME -->` with a file's text,
so the README's measured tables come from the scripts that measure them.

    scripts/readme_splice.py NAME FILE [--readme README.md]
"""
import argparse
import pathlib
import sys


def main() -> int:
    root = pathlib.Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("file")
    parser.add_argument("--readme", default=str(root / "README.md"))
    args = parser.parse_args()
    readme = pathlib.Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    begin, end = f"<!-- {args.name} -->", f"<!-- /{args.name} -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        print(f"{readme}: needs exactly one '{begin}' before one '{end}'", file=sys.stderr)
        return 1
    block = pathlib.Path(args.file).read_text(encoding="utf-8").strip()
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{begin}\n{block}\n{end}{tail}", encoding="utf-8")
    tmp.replace(readme)
    print(f"{readme}: '{args.name}' block replaced from {args.file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
