"""``qcow2-tool create``: qemu-img create's options, ``Formatting …`` line, messages and exit codes.

``-o`` values are parsed the way qemu-img parses them (booleans ``on/off/yes/no/true/false``, sizes
with suffixes, unknown keys refused before anything is printed); enumerations and combinations are
checked by :func:`qcow2.create.validate` after the ``Formatting`` line, as qemu-img does.
"""

from __future__ import annotations

import sys

from .create import create_image_file
from .errors import BackingError, Qcow2Error
from .storage import Storage
from .units import SizeError, parse_size

_BOOLS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}
_BOOL_KEYS = ("lazy_refcounts", "extended_l2", "data_file_raw")
_KNOWN = ("size", "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw",
          "encryption", "cluster_size", "preallocation", "lazy_refcounts", "refcount_bits",
          "compression_type", "extended_l2", "encrypt.format")
# the order qemu-img prints them in (values as given, defaults filled in)
_PRINT_ORDER = ("encryption", "encrypt.format", "cluster_size", "extended_l2", "preallocation",
                "compression_type", "size", "compat", "backing_file", "backing_fmt", "data_file",
                "data_file_raw", "lazy_refcounts", "refcount_bits")
_DEFAULTS = {"cluster_size": "65536", "extended_l2": "off", "compression_type": "zlib",
             "lazy_refcounts": "off", "refcount_bits": "16"}


class CreateError(Exception):
    """A message for ``qcow2-tool: <path>: <message>`` or, with ``bare``, without the path;
    ``prefix_all``: every line gets the prefix (qemu-img reported them one by one)."""

    def __init__(self, message: str, bare: bool = False, prefix_all: bool = False):
        super().__init__(message)
        self.bare = bare
        self.prefix_all = prefix_all


def parse_options(text_list: list[str]) -> dict[str, str]:
    """``-o k=v,k=v`` (repeatable; ``,,`` escapes a comma) -> dict of raw strings.  As QEMU's
    option parser: a bare ``key`` means ``key=on`` and ``nokey`` means ``key=off``; an empty
    list, one starting with a comma or ending with an unescaped one is refused."""
    out: dict[str, str] = {}
    for text in text_list:
        trailing = len(text) - len(text.rstrip(","))
        if not text or text[0] == "," or trailing % 2:
            raise CreateError(f"Invalid option list: {text}", bare=True)
        for item in text.replace(",,", "\0").split(","):
            if not item:
                continue
            key, equals, value = item.partition("=")
            key = key.replace("\0", ",")
            if not equals:
                key, value = (key[2:], "off") if key.startswith("no") else (key, "on")
            if key not in _KNOWN:
                raise CreateError(f"Invalid parameter '{key}'")
            out[key] = value.replace("\0", ",")
    return out


def _bool(key: str, value: str) -> bool:
    try:
        return _BOOLS[value]
    except KeyError:
        raise CreateError(f"Parameter '{key}' expects 'on' or 'off'") from None


def _size(key: str, value: str) -> int:
    try:
        return parse_size(value)
    except SizeError:
        raise CreateError(f"Parameter '{key}' expects a non-negative number below 2^64\n"
                          "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                          "peta-\nand exabytes, respectively.") from None


def _typed(opts: dict[str, str]) -> dict:
    """Raw ``-o`` strings -> keyword arguments of :func:`qcow2.create` (qemu-img's parse errors)."""
    kwargs: dict = {}
    if "cluster_size" in opts:
        kwargs["cluster_size"] = _size("cluster_size", opts["cluster_size"])
    if "refcount_bits" in opts:
        try:
            kwargs["refcount_bits"] = int(opts["refcount_bits"], 0)
        except ValueError:
            raise CreateError("Parameter 'refcount_bits' expects a non-negative number") from None
    for key in _BOOL_KEYS:
        if key in opts:
            kwargs[key] = _bool(key, opts[key])
    for key in ("compat", "compression_type", "preallocation", "backing_file", "backing_fmt",
                "data_file"):
        if key in opts:
            kwargs[key] = opts[key]
    return kwargs


def create_kwargs(option_strings: list[str]) -> dict:
    """``-o`` option strings (convert's) -> keyword arguments of :func:`qcow2.create`."""
    opts = parse_options(option_strings)
    if "size" in opts or "backing_file" in opts:
        raise CreateError("size and backing_file cannot be given to convert -o")
    return _typed(opts)


def run_create(args) -> int:
    """Body of the ``create`` command; returns the exit status."""
    fmt = args.format or "raw"
    opts = parse_options(args.options or [])
    if args.backing is not None:
        opts["backing_file"] = args.backing
    if args.backing_format is not None:
        opts["backing_fmt"] = args.backing_format
    size = None
    if args.size is not None:
        if "size" in opts:
            raise CreateError("The image size must be specified only once")
        try:
            size = parse_size(args.size)
        except SizeError as e:
            if not e.too_large:
                raise CreateError("Invalid image size specified. You may use k, M, G, T, P or E "
                                  "suffixes for\nkilobytes, megabytes, gigabytes, terabytes, "
                                  "petabytes and exabytes.", bare=True,
                                  prefix_all=True) from None
            raise CreateError("Invalid image size specified. Must be between 0 and "
                              "9223372036854775807.", bare=True) from None
    elif "size" in opts:
        size = _size("size", opts["size"])
    if size is not None and size > (1 << 63) - 1:
        raise CreateError("Invalid image size specified. Must be between 0 and "
                          "9223372036854775807.", bare=True)
    for key in _BOOL_KEYS:
        if key in opts:
            _bool(key, opts[key])
    if fmt == "raw":
        return _create_raw(args, size)
    if fmt != "qcow2":
        raise CreateError(f"Unknown file format '{fmt}'", bare=True)
    if opts.get("backing_file") is not None and opts.get("backing_fmt") is None:
        message = "Backing file specified without backing format"
        try:
            from .image import _relative_to, probe_format
            detected = probe_format(_relative_to(args.filename, opts["backing_file"]))
            message += f"\nDetected format of {detected}."
        except Qcow2Error:
            pass
        raise CreateError(message)
    kwargs = _typed(opts)
    if opts.get("encryption") not in (None, "off", "no", "false") or "encrypt.format" in opts:
        raise CreateError("encryption is not supported (qcow2-tool creates unencrypted images)")
    unsafe = args.unsafe
    if size is None and (opts.get("backing_file") is None or unsafe):
        raise CreateError("Image creation needs a size parameter")
    if opts.get("backing_file") is not None and not unsafe:
        from .create import backing_size        # the backing file must open
        try:
            found = backing_size(args.filename, opts["backing_file"], opts.get("backing_fmt"))
        except BackingError as e:
            raise CreateError(str(e).replace("Could not open backing file: ", "")) from None
        if size is None:
            size = found
    if not args.quiet:
        sys.stdout.write(_formatting_line(args.filename, opts, size))
        sys.stdout.flush()
    try:
        create_image_file(args.filename, size, unsafe=True, **kwargs)
    except Qcow2Error as e:
        raise CreateError(str(e)) from None
    return 0


def _formatting_line(path: str, opts: dict[str, str], size: int) -> str:
    shown = dict(_DEFAULTS)
    shown.update({k: v for k, v in opts.items() if k != "size"})
    if "cluster_size" in opts:
        shown["cluster_size"] = str(_size("cluster_size", opts["cluster_size"]))
    shown["size"] = str(size)
    words = [f"{k}={shown[k]}" for k in _PRINT_ORDER if k in shown]
    return f"Formatting '{path}', fmt=qcow2 {' '.join(words)}\n"


def _create_raw(args, size: int | None) -> int:
    if size is None:
        raise CreateError("Image creation needs a size parameter")
    if not args.quiet:
        sys.stdout.write(f"Formatting '{args.filename}', fmt=raw size={size}\n")
    target = Storage(args.filename, create=True, what="target")
    try:
        target.truncate(0)
        target.truncate(size)
    finally:
        target.close()
    return 0


def add_parser(sub, common) -> None:
    """Register ``create`` on the CLI's subparsers."""
    p = sub.add_parser("create", help="create an image (qemu-img create)")
    p.add_argument("-f", "--format", dest="format", default=None, help="image format (qcow2/raw)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="comma-separated k=v creation options (repeatable)")
    p.add_argument("-b", dest="backing", default=None, metavar="BACKING_FILE")
    p.add_argument("-F", dest="backing_format", default=None, metavar="BACKING_FMT")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (SIZE is then required)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename")
    p.add_argument("size", nargs="?", default=None)
    p.set_defaults(func=cmd_create)


def cmd_create(args) -> int:
    from .cli import CliError
    try:
        return run_create(args)
    except CreateError as e:
        message = str(e) if e.bare else f"{args.filename}: {e}"
        raise CliError(message, prefix_all=e.prefix_all) from None
    except Qcow2Error as e:
        raise CliError(f"{args.filename}: {e}", prefix_all=False) from None

