"""``qcow2-tool``: qemu-img's words (``info``, ``map``, ``convert``, ``create``, ``check``,
``resize``) and qemu-io's (``io``).

Options, output formats, messages and exit codes follow qemu-img / qemu-io 7.2, so that scripts
written for them keep working.  Every error ends as one ``qcow2-tool: <message>`` line on stderr and
exit status 1; never a traceback.  Open failures read ``Could not open 'X': <reason>``.

``convert`` copies with :func:`qcow2.convert.copy_to_raw` and writes the target through
:class:`~qcow2.storage.Storage` only.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import Qcow2Error
from .image import Image, RawImage, open_layer, probe_format
from .info import (MapOutputError, dumps_qemu_json, format_info_human, iter_map_human,
                   iter_map_json, image_info, raw_info)
from .qemu_io import Session, command_writes
from .convert import DEFAULT_SPARSE_SIZE, copy_to_image, copy_to_raw
from .storage import Storage
from .units import INT64_MAX, SizeError, parse_size

PROG = "qcow2-tool"
MAX_SPARSE_SIZE = 16 << 20
_SUFFIX_HINT = ("You may use k, M, G, T, P or E suffixes for\n"
                "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")


class CliError(Exception):
    """Printed as ``qcow2-tool: <message>`` (each line prefixed), exit status ``status``."""

    def __init__(self, message: str, status: int = 1, prefix_all: bool = True):
        super().__init__(message)
        self.status = status
        self.prefix_all = prefix_all   # False: continuation lines printed as they are


class _Parser(argparse.ArgumentParser):
    """argparse that exits 1 on usage errors (qemu-img's status), not 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.print_usage(sys.stderr)
        raise CliError(f"error: {message}")


def _print_error(message: str, prefix_all: bool = True) -> None:
    for index, line in enumerate(message.splitlines() or [""]):
        sys.stderr.write(f"{PROG}: {line}\n" if prefix_all or not index else f"{line}\n")


# -- opening ------------------------------------------------------------------------------------
def _check_format(path: str, fmt: str | None) -> None:
    if fmt not in (None, "qcow2"):
        raise CliError(f"Could not open '{path}': image format '{fmt}' is not supported "
                       f"(qcow2-tool handles qcow2 only)")


def open_image(path: str, fmt: str | None = None, *, open_backing: bool = True) -> Image:
    """Open a qcow2 image read-only; errors become ``Could not open 'X': <reason>``."""
    _check_format(path, fmt)
    try:
        return Image(path, "r", open_backing=open_backing)
    except Qcow2Error as e:
        raise CliError(f"Could not open '{path}': {e}") from None
    except OSError as e:
        raise CliError(f"Could not open '{path}': {e.strerror or e}") from None


def _open_layer(path: str, fmt: str | None):
    """One layer of a backing chain, without its own backing (qemu-img info --backing-chain)."""
    if fmt not in (None, "qcow2", "raw"):
        _check_format(path, fmt)
    try:
        return open_layer(path, fmt, with_io=False)
    except Qcow2Error as e:
        raise CliError(f"Could not open '{path}': {e}") from None


def _backing_chain_info(path: str, fmt: str | None) -> list:
    """Info dicts of the whole chain, each layer opened alone; a loop is an error."""
    layers = []
    try:
        layer = open_image(path, fmt, open_backing=False)
        layers.append(layer)
        seen = {os.path.realpath(path)}
        while getattr(layer, "format", "raw") == "qcow2" and layer.header.backing_file_name is not None:
            full = layer.full_backing_filename
            real = os.path.realpath(full)
            if real in seen:
                raise CliError(f"Backing file '{full}' creates an infinite loop.")
            seen.add(real)
            layer = _open_layer(full, layer.header.backing_format)
            layers.append(layer)
        return [raw_info(x) if x.format == "raw" else image_info(x) for x in layers]
    finally:
        for x in layers:
            x.close()


def _output_format(value: str) -> str:
    if value not in ("human", "json"):
        raise CliError("--output must be used with human or json as argument.")
    return value


def _parse_offset(text: str, what: str) -> int:
    try:
        value = parse_size(text)
    except SizeError as e:
        if e.too_large:
            raise CliError(f"Invalid {what} specified. Must be between 0 and {INT64_MAX}.") from None
        raise CliError(f"Invalid {what} specified. {_SUFFIX_HINT}") from None
    return value


# -- info -----------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    output = _output_format(args.output)
    if args.backing_chain:
        result = _backing_chain_info(args.filename, args.format)
    else:
        with open_image(args.filename, args.format, open_backing=False) as img:
            result = image_info(img)
    if output == "json":
        sys.stdout.write(dumps_qemu_json(result) + "\n")
    else:
        sys.stdout.write(format_info_human(result))
    return 0


# -- map ------------------------------------------------------------------------------------------
def _layer_filenames(img) -> list[str]:
    names = []
    layer = img
    while layer is not None:
        data_name = getattr(layer, "data_filename", None)
        names.append(data_name if data_name is not None else layer.filename)
        layer = getattr(layer, "backing", None)
    return names


def cmd_map(args) -> int:
    output = _output_format(args.output)
    start = _parse_offset(args.start_offset, "start offset") if args.start_offset else 0
    max_length = _parse_offset(args.max_length, "max length") if args.max_length else None
    with open_image(args.filename, args.format) as img:
        end = img.size if max_length is None else min(img.size, start + max_length)
        extents = img.iter_map(start, end - start) if end > start else iter(())
        if output == "json":
            pieces = iter_map_json(extents, start)
        else:
            pieces = iter_map_human(extents, _layer_filenames(img))
        try:
            for piece in pieces:   # streamed: memory stays bounded on any number of extents
                sys.stdout.write(piece)
        except MapOutputError as e:
            raise CliError(str(e)) from None
    return 0


# -- convert --------------------------------------------------------------------------------------
class _Progress:
    """qemu-img's ``-p`` line: ``    (12.34/100%)\\r`` on stdout, updated every whole percent."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.total = total
        self.last = -1.0
        self.update(0)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        percent = 100.0 * done / self.total if self.total else 100.0
        if percent - self.last >= 1.0 or (percent == 100.0 and self.last < 100.0) \
                or self.last < 0:
            self.last = percent
            sys.stdout.write("    (%3.2f/100%%)\r" % percent)
            sys.stdout.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stdout.write("    (100.00/100%)\r\n")
            sys.stdout.flush()


def _snapshot_arg(text: str) -> str:
    for prefix in ("snapshot.id=", "snapshot.name="):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _create_target(path: str, sources: Sequence[str], out_fmt: str) -> Storage:
    """Create (or open) the target and empty it; every change goes through Storage.  Refuses a
    target that is one of the files being read (the source, its backing chain, data files).
    ``out_fmt`` names the output format in the messages, as qemu-img does."""
    for src in sources:
        try:
            if os.path.samefile(src, path):
                raise CliError(f"{path}: error while converting {out_fmt}: the target is "
                               f"'{src}', which is being read")
        except OSError:
            pass
    try:
        target = Storage(path, create=True, what="target")
        if target.size:
            # Empty it through this short-lived descriptor and write through a new one, as
            # qemu-img does: on ext4 (auto_da_alloc) a truncation to 0 makes the next close()
            # flush the file; let that be this close, on an empty file, not the final one after
            # the copy (which then costs ~0.25 s per 768 MiB and a synchronous writeback)
            target.truncate(0)
            target.close()
            target = Storage(path, writable=True, what="target")
    except Qcow2Error as e:
        raise CliError(f"{path}: error while converting {out_fmt}: {e}") from None
    return target


def _open_source(path: str, fmt: str | None):
    """A convert source: a qcow2 image (with its chain) or a raw file (``-f raw``, or probed)."""
    if fmt not in (None, "qcow2", "raw"):
        _check_format(path, fmt)
    try:
        if fmt == "raw" or (fmt is None and probe_format(path) == "raw"):
            return RawImage(path)
    except Qcow2Error as e:
        raise CliError(f"Could not open '{path}': {e}") from None
    return open_image(path, fmt)


def cmd_convert(args) -> int:
    _target_cache(args.cache)
    if args.source_cache not in _CACHE_MODES:
        raise CliError(f"Invalid source cache option: {args.source_cache}")
    if args.output_format not in ("raw", "qcow2"):
        raise CliError(f"output format '{args.output_format}' is not supported "
                       f"(qcow2-tool writes raw and qcow2)")
    if args.compress and args.output_format != "qcow2":
        raise CliError("Compression not supported for this file format")
    granularity = DEFAULT_SPARSE_SIZE
    if args.sparse_size is not None:
        try:
            granularity = parse_size(args.sparse_size)
        except SizeError:
            raise CliError("Invalid buffer size for sparse output specified. "
                           + _SUFFIX_HINT) from None
        if granularity % 512 or granularity > MAX_SPARSE_SIZE:
            raise CliError("Invalid buffer size for sparse output specified. Valid sizes are "
                           "multiples of 512 up to 16777216. Select 0 to disable sparse "
                           "detection (fully allocates output).")
    with _open_source(args.source, args.format) as img:
        reader = img
        if args.snapshot is not None:
            if not isinstance(img, Image):
                raise CliError("Failed to load snapshot: Can't find snapshot")
            try:
                reader = img.snapshot(_snapshot_arg(args.snapshot), size=img.size)
            except Qcow2Error:
                raise CliError("Failed to load snapshot: Can't find snapshot") from None
        size = reader.size
        sources = [img.filename, *_layer_filenames(img)] if isinstance(img, Image) \
            else [img.filename]
        progress = _Progress(args.progress and not args.quiet, size)
        if args.output_format == "qcow2":
            _convert_to_qcow2(args, reader, size, sources, progress)
            progress.finish()
            return 0
        dst = _create_target(args.target, sources, "raw")
        try:
            dst.truncate(size)
            copy_to_raw(reader, dst, sparse_size=granularity, progress=progress.update)
            progress.finish()
        finally:
            dst.close()
    return 0


# qemu-img's cache modes -> ours: the O_DIRECT / O_DSYNC ones write through the page cache here
# and are made durable by the flush at the end, like writeback
_CACHE_MODES = {"unsafe": "unsafe", "writeback": "writeback", "none": "writeback",
                "writethrough": "writeback", "directsync": "writeback"}


def _target_cache(mode: str) -> str:
    """``-t``: the target's cache mode (qemu-img convert's default is ``unsafe``: no fsync)."""
    if mode not in _CACHE_MODES:
        raise CliError(f"Invalid cache option: {mode}")
    return _CACHE_MODES[mode]


def _convert_to_qcow2(args, reader, size: int, sources, progress) -> None:
    from .cli_create import CreateError, create_kwargs
    from .create import create
    _create_target(args.target, sources, "qcow2").close()   # refuses a target that is a source
    try:
        kwargs = create_kwargs(args.options or [])
    except CreateError as e:
        raise CliError(str(e)) from None
    try:
        target = create(args.target, size, cache=_target_cache(args.cache), **kwargs)
    except Qcow2Error as e:
        raise CliError(f"{args.target}: error while converting qcow2: {e}") from None
    with target:
        copy_to_image(reader, target, compress=args.compress, progress=progress.update)


# -- io -------------------------------------------------------------------------------------------
def cmd_io(args) -> int:
    commands = list(args.cmd or [])
    if not args.read_only and any(command_writes(c) for c in commands):
        mode = "r+"
    else:
        mode = "r"
    _check_format(args.filename, args.format)
    try:
        img = Image(args.filename, mode)
    except (Qcow2Error, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        if not args.read_only and os.path.isdir(args.filename):
            reason = f"Could not open '{args.filename}': Is a directory"   # qemu-io opens rw
        raise CliError(f"can't open device {args.filename}: {reason}") from None
    with img:
        session = Session(img, sys.stdout, sys.stderr)
        if not args.cmd:
            commands = sys.stdin
        for line in commands:
            session.run(line)
            sys.stdout.flush()
    return 1 if session.failed else 0


# -- argument parsing -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Inspect and convert qcow2 images "
                     "(qemu-img / qemu-io compatible subset).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def common(p, output=True):
        p.add_argument("-f", "--format", dest="format", default=None,
                       help="image format (only qcow2)")
        p.add_argument("-U", "--force-share", action="store_true",
                       help="accepted for qemu-img compatibility; images are opened read-only")
        if output:
            p.add_argument("--output", default="human", metavar="human|json",
                           help="output format")

    p = sub.add_parser("info", help="show image information (qemu-img info)")
    common(p)
    p.add_argument("--backing-chain", action="store_true", help="show the whole backing chain")
    p.add_argument("filename")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("map", help="show the allocation map (qemu-img map)")
    common(p)
    p.add_argument("--start-offset", metavar="OFFSET", default=None)
    p.add_argument("--max-length", metavar="LEN", default=None)
    p.add_argument("filename")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("convert", help="convert an image (qemu-img convert -O raw|qcow2)")
    common(p, output=False)
    p.add_argument("-O", dest="output_format", default="raw", help="output format (raw, qcow2)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="qcow2 creation options, as for create (repeatable)")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="compress the target's clusters (qcow2)")
    p.add_argument("-l", dest="snapshot", default=None, metavar="SNAPSHOT",
                   help="internal snapshot: ID, name, snapshot.id=ID or snapshot.name=NAME")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-S", dest="sparse_size", default=None, metavar="SIZE",
                   help="zero run length left as a hole (default 4k; 0 = fully allocate)")
    p.add_argument("-t", dest="cache", default="unsafe", metavar="CACHE",
                   help="target cache mode: unsafe (default, as qemu-img: no fsync), writeback, "
                        "none, writethrough, directsync (these fsync at the end)")
    p.add_argument("-T", dest="source_cache", default="writeback", metavar="CACHE",
                   help="source cache mode (accepted; the source is only read)")
    p.add_argument("source")
    p.add_argument("target")
    p.set_defaults(func=cmd_convert)

    from .cli_create import add_parser as add_create
    add_create(sub, common)
    from .cli_check import add_parser as add_check
    add_check(sub)
    from .cli_resize import add_parser as add_resize
    add_resize(sub, common)

    p = sub.add_parser("io", help="run qemu-io commands (read, write, discard, flush)")
    common(p, output=False)
    p.add_argument("-r", "--read-only", action="store_true", help="open read-only")
    p.add_argument("-c", "--cmd", action="append", metavar="CMD",
                   help="command to run (repeatable); without -c, commands come from stdin")
    p.add_argument("filename")
    p.set_defaults(func=cmd_io)
    parser.commands = sub.choices
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options and operands in any order after the command, as qemu-img's getopt takes them
    (``create IMG -o cluster_size=512 1G``): the command's own parser reads them intermixed."""
    command = parser.commands.get(argv[0]) if argv else None
    if command is None or "--" in argv:
        # help, version, the error for a bad command; or "--" before a name that starts with
        # "-", which parse_intermixed_args loses (operands then come after the options anyway)
        return parser.parse_args(argv)
    args = command.parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qcow2-tool`` and ``python -m qcow2``; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        size = None
        if argv[:1] == ["resize"]:       # the size may look like an option: "-1G"
            from .cli_resize import split_size
            argv, size = split_size(argv)
        args = _parse(parser, argv)
        if size is not None:
            args.size = size
        return args.func(args)
    except CliError as e:
        _print_error(str(e), e.prefix_all)
        return e.status
    except Qcow2Error as e:
        _print_error(str(e))
        return 1
    except BrokenPipeError:
        return 1
    except OSError as e:
        _print_error(f"{str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}")
        return 1
    except SystemExit as e:   # argparse --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug of ours: still one line and qemu-img's failure status
        _print_error(f"internal error: {type(e).__name__}: {e} (please report this bug)")
        return 1
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
