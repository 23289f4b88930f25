"""``qcow2-tool resize [--shrink] [--preallocation=MODE] [-q] IMG [+|-]SIZE``: qemu-img resize's
options, messages and exit codes.

As qemu-img does, the size is taken off the end of the command line before the options are
parsed, so that ``resize img -1G`` is a relative shrink and not an unknown option ``-1``.
"""

from __future__ import annotations

import sys

from .errors import Qcow2Error
from .units import INT64_MAX, SizeError, parse_size

_UINT64_MAX = (1 << 64) - 1
_SIZE_HINT = ("Parameter 'size' expects a non-negative number below 2^64\n"
              "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
              "and exabytes, respectively.")
_SHRINK_WARNING = ("warning: Shrinking an image will delete all data beyond the shrunken "
                   "image's end. Before performing such an operation, make sure there is no "
                   "important data there.")


def add_parser(sub, common) -> None:
    """Register ``resize`` on the CLI's subparsers (``common`` adds -f/-U)."""
    p = sub.add_parser("resize", help="change the virtual size (qemu-img resize)")
    common(p, output=False)
    p.add_argument("--shrink", action="store_true", help="allow making the image smaller")
    p.add_argument("--preallocation", default="off", metavar="MODE",
                   help="off, metadata, falloc or full for the grown space")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename", nargs="*")
    p.set_defaults(func=cmd_resize)


def split_size(argv: list[str]) -> tuple[list[str], str]:
    """``(argv without the size, size text)`` for ``resize`` (``argv[0] == "resize"``)."""
    from .cli import CliError
    if len(argv) < 3:
        raise CliError("Not enough arguments\nTry 'qcow2-tool --help' for more information",
                       prefix_all=False)
    return argv[:-1], argv[-1]


def _parse_new_size(text: str, current: int) -> int:
    """The new size in bytes from qemu-img's ``[+|-]SIZE`` (relative to ``current``)."""
    from .cli import CliError
    sign = text[:1] if text[:1] in ("+", "-") else ""
    body = text[len(sign):]
    try:
        value = parse_size(body, limit=_UINT64_MAX)
    except SizeError as e:
        if e.too_large:
            raise CliError(f"Value '{body}' is out of range for parameter 'size'") from None
        raise CliError(_SIZE_HINT, prefix_all=False) from None
    new_size = current + value if sign == "+" else current - value if sign == "-" else value
    if not 0 < new_size <= INT64_MAX:
        raise CliError("New image size must be positive")
    return new_size


def cmd_resize(args) -> int:
    from .cli import CliError, _check_format
    if len(args.filename) != 1:
        raise CliError("Expecting image file name and size\n"
                       "Try 'qcow2-tool --help' for more information", prefix_all=False)
    filename = args.filename[0]
    if args.preallocation not in ("off", "metadata", "falloc", "full"):
        raise CliError(f"Invalid preallocation mode '{args.preallocation}'")
    _check_format(filename, args.format)
    import qcow2
    try:
        img = qcow2.open(filename, "r+")
    except (Qcow2Error, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise CliError(f"Could not open '{filename}': {reason}") from None
    with img:
        new_size = _parse_new_size(args.size, img.size)
        if new_size < img.size and not args.shrink:
            raise CliError(f"Use the --shrink option to perform a shrink operation.\n"
                           f"{_SHRINK_WARNING}")
        if new_size % 512:
            raise CliError("The new size must be a multiple of 512")
        try:
            img.resize(new_size, shrink=args.shrink, preallocation=args.preallocation)
        except Qcow2Error as e:
            raise CliError(str(e)) from None
    if not args.quiet:
        sys.stdout.write("Image resized.\n")
    return 0
