"""The ``miniray`` command: ``miniray demo``, ``miniray rl --config-name=... k=v``, ``miniray info``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: miniray COMMAND [ARGS]

commands:
  demo [--steps N] [--mode async|sync] ...   async RL on a tiny model (the main job)
  rl --config-name=NAME key=value ...         an RL run from a config (see miniray.rl.main)
  info                                        version and available backends
"""


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if words else 2
    command, rest = words[0], words[1:]
    if command == "demo":
        from miniray.rl.demo import main as demo

        demo(rest)
        return 0
    if command == "rl":
        from miniray.rl.main import main as rl_main

        rl_main(rest)
        return 0
    if command == "info":
        import importlib.util

        import miniray

        backends = ["local", "inline"] + (["ray"] if importlib.util.find_spec("ray") else [])
        print(f"miniray {miniray.__version__}; backends: {', '.join(backends)}")
        return 0
    print(f"miniray: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
