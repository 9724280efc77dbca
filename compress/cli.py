"""The ``compress`` console script: ``compress run|check|verify [ARGS...]``.

Each command is the module of the same name, handed the rest of the command line unchanged
(``compress run P.yaml --set x=1`` is ``python -m compress.run P.yaml --set x=1``): same
flags, same help, same exit codes. A command's module is imported only when it is chosen,
so ``compress verify`` and ``compress check`` start without torch.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable

# command -> (module, what it does); the modules' own parsers hold the flags and the help
COMMANDS = {
    "run": ("compress.run", "run a compression pipeline described in YAML"),
    "check": ("compress.check", "compare a benchmark results.json with a stored reference"),
    "verify": ("compress.verify", "check a deploy bundle the way an edge team would"),
}
EXIT_USAGE = 2


def usage() -> str:
    lines = [
        "usage: compress {run,check,verify} ...",
        "",
        "Compress PyTorch classifiers with a YAML pipeline, compare results, verify deploy bundles.",
        "",
        "commands:",
        *(f"  {name:<8} {text} (python -m {module})" for name, (module, text) in COMMANDS.items()),
        "",
        "'compress COMMAND --help' shows a command's options and exit codes.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return EXIT_USAGE
    command, rest = args[0], args[1:]
    if command in ("-h", "--help"):
        print(usage())
        return 0
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(
            f"compress: unknown command {command!r}{hint}; choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return _entry(command)(rest)


def _entry(command: str) -> Callable[[list[str]], int]:
    """The chosen command's ``main``, imported only now (static imports: no module named by text)."""
    if command == "run":
        from compress.run import main as entry
    elif command == "check":
        from compress.check import main as entry
    else:
        from compress.verify import main as entry
    return entry


if __name__ == "__main__":
    sys.exit(main())
