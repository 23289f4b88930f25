"""``qcow2-tool check``: qemu-img check's options, output, messages and exit codes, plus the
overlap map (``--overlap-mem``, ``--overlap-check``, ``--events``).

Per-item lines go to stderr as the check finds them; the summary (human or JSON) to stdout; exit
0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 not a qcow2 image.  Overlap findings are
extra stderr lines starting with ``OVERLAP``; memory-limit events are JSON lines on stderr or in
``--events FILE``.  The JSON keeps exactly qemu-img's keys.
"""

from __future__ import annotations

import sys

from .check import DEFAULT_OVERLAP_MEM, check_image
from .errors import NotQcow2Error, Qcow2Error
from .events import EventEmitter, json_lines_writer
from .storage import Storage
from .units import SizeError, parse_size


class _EventsFile:
    """``--events FILE``: JSON lines appended through :class:`~qcow2.storage.Storage` (the one
    door to the disk), each line written as it happens."""

    def __init__(self, path: str):
        self._file = Storage(path, create=True, what="events file")

    def write(self, text: str) -> None:
        self._file.pwrite(text.encode(), self._file.size)

    def flush(self) -> None:
        """Lines are written at once; nothing to flush."""

    def close(self) -> None:
        self._file.close()


def add_parser(sub) -> None:
    """Register ``check`` on the CLI's subparsers."""
    p = sub.add_parser("check", help="check (and repair) an image (qemu-img check)")
    p.add_argument("-f", "--format", dest="format", default=None, help="image format (qcow2)")
    p.add_argument("--output", default="human", metavar="human|json")
    p.add_argument("-r", dest="repair", default=None, metavar="leaks|all",
                   help="repair leaks, or leaks and corruptions")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted; ignored")
    p.add_argument("--overlap-mem", default=None, metavar="SIZE",
                   help="memory budget of the overlap map (qemu size suffixes; default "
                        f"{DEFAULT_OVERLAP_MEM >> 20}M)")
    p.add_argument("--overlap-check", default="all", metavar="MODE",
                   help="metadata types entered into the overlap map: none, constant, cached, "
                        "all (default all)")
    p.add_argument("--events", default=None, metavar="FILE",
                   help="write QMP events as JSON lines to FILE instead of stderr")
    p.add_argument("filename")
    p.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    from .cli import CliError, _check_format, _output_format
    from .image import Image, probe_format
    output = _output_format(args.output)
    if args.repair not in (None, "leaks", "all"):
        raise CliError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {args.repair}\n"
                       "Try 'qcow2-tool --help' for more information", prefix_all=False)
    budget = None
    if args.overlap_mem is not None:
        try:
            budget = parse_size(args.overlap_mem)
        except SizeError:
            raise CliError(f"Invalid --overlap-mem value '{args.overlap_mem}': use a size such "
                           "as 4M (suffixes k, M, G, T, P, E)") from None
    if args.overlap_check not in ("none", "constant", "cached", "all"):
        raise CliError(f"Invalid --overlap-check value '{args.overlap_check}': use none, "
                       "constant, cached or all")
    # A raw file (probed, or -f raw) is "not checkable", once it opens; with -f qcow2 qemu-img
    # opens the file as qcow2, and a bad magic is an open error, exit 1 (found by fuzzing)
    if args.format in (None, "raw"):
        try:
            probed = probe_format(args.filename)
        except Qcow2Error as e:
            raise CliError(f"Could not open '{args.filename}': {e}") from None
        if args.format == "raw" or probed != "qcow2":
            raise CliError("This image format does not support checks", status=63)
    else:
        _check_format(args.filename, args.format)
    events_file = _EventsFile(args.events) if args.events else None
    try:
        emitter = EventEmitter(json_lines_writer(events_file or sys.stderr))
        mode = "r+" if args.repair else "r"
        try:
            img = Image(args.filename, mode, _repair=True,
                        overlap_check="cached" if args.repair else "none")
        except NotQcow2Error as e:
            raise CliError(f"Could not open '{args.filename}': {e}",
                           status=63 if args.format is None else 1) from None
        except Qcow2Error as e:
            raise CliError(f"Could not open '{args.filename}': {e}") from None

        def say(line: str) -> None:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

        with img:
            result = check_image(img, args.repair, overlap_mem=budget, events=emitter,
                                 filename=args.filename, say=say,
                                 overlap_types=args.overlap_check)
        for line in result.overlaps:
            say(line)
    finally:
        if events_file is not None:
            events_file.close()
    if result.failed is not None:
        from .cli import _print_error
        for message in result.errors:      # an error line, then its hint lines unprefixed
            _print_error(message, prefix_all=False)
        raise CliError(f"Check failed: {result.failed}")
    if output == "json":
        from .info import dumps_qemu_json
        sys.stdout.write(dumps_qemu_json(result.to_json()) + "\n")
    elif not args.quiet:
        fixed = ""
        if result.leaks_fixed or result.corruptions_fixed:
            fixed = ("The following inconsistencies were found and repaired:\n\n"
                     f"    {result.leaks_fixed} leaked clusters\n"
                     f"    {result.corruptions_fixed} corruptions\n\n"
                     "Double checking the fixed image now...\n")
        sys.stdout.write(fixed + result.human())
    if result.check_errors:
        raise CliError("Check failed")
    return result.exit_code
