"""Write WebDataset shards: the embedded demo data, or a folder of images plus a captions file.

    python jobs/make_shards.py demo --out DIR [--num-samples 2000] [--image-size 32] [--seed 0]
        [--shard-size 500]
    python jobs/make_shards.py folder --images DIR --captions FILE --out DIR [--shard-size 1000]

The output directory is what `data.shards` then points at. The work is in pipeline/data/shards.py.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.data.shards import folder_to_shards, write_demo_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of the two sub-commands, `demo` and `folder`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="generate the captioned-shapes demo data")
    demo.add_argument("--out", required=True, help="output directory for the shards")
    demo.add_argument("--num-samples", type=int, default=2000)
    demo.add_argument("--image-size", type=int, default=32, help="image side in pixels (>= 32)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--shard-size", type=int, default=500, help="samples per shard")

    folder = commands.add_parser("folder", help="shard a folder of images described by a captions file")
    folder.add_argument("--images", required=True, help="directory holding the images")
    folder.add_argument(
        "--captions", required=True, help="CSV with a 'file,caption' header, or JSONL of {file, caption}"
    )
    folder.add_argument("--out", required=True, help="output directory for the shards")
    folder.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the shards the arguments ask for and print how many and where."""
    args = parse_args(argv)
    try:
        if args.command == "demo":
            shards = write_demo_shards(
                args.out, args.num_samples, args.image_size, args.seed, args.shard_size
            )
        else:
            shards = folder_to_shards(args.images, args.captions, args.out, args.shard_size)
    except (FileNotFoundError, ValueError) as error:
        # Bad input is the user's to fix: the message names the file and line, a traceback adds nothing.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(shards)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
