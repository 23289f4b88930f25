"""qemu-io's command language, run against an open image (``qcow2-tool io -c CMD``).

Theory of operation
-------------------
A command line is split on whitespace (no quoting, as in qemu-io), the first word picks a
:class:`Command` from :data:`COMMANDS` (by name or alias), the generic argument-count check runs
on the raw words, then the command parses its options with a GNU-style ``getopt`` (options may
follow operands; ``--`` ends them) and runs.  Every command returns True on success; the session
remembers whether any command failed, which becomes the exit status (qemu-io 7.2 runs all ``-c``
commands and exits 1 if one failed).

Output goes where qemu-io 7.2 puts it: results, pattern failures, ``read failed: ...``, usage
lines and parse errors on stdout; option errors and argument-count errors on stderr.  Timing lines
(``64 KiB, 1 ops; 00.00 sec (...)``) use qemu-io's units (:func:`qcow2.units.format_io_size`).

Write commands (``write``, ``discard``) map our errors to the errno text qemu-io prints
(``write failed: Input/output error``); the detail of our error goes to stderr.

Adding a command: write ``def _cmd_x(session, args) -> bool`` and
register a :class:`Command` in :data:`COMMANDS`; helpers :func:`getopt`, :func:`parse_count`,
:meth:`Session.report` are there for it.  ``Command.writes`` tells the CLI to open read-write.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from .errors import Qcow2Error, ReadOnlyError, RequestError, UnsupportedError
from .units import SizeError, format_io_size, format_io_time, parse_size

__all__ = ["Session", "Command", "COMMANDS", "getopt", "GetoptError", "parse_count",
           "REQUEST_MAX_BYTES", "command_writes"]

#: Largest request qemu's block layer accepts (INT_MAX rounded down to 512).
REQUEST_MAX_BYTES = 2147483136


class GetoptError(Exception):
    """An unknown option or a missing option argument (message as glibc's getopt prints it)."""


def getopt(args: list[str], optstring: str, prog: str) -> tuple[list[tuple[str, str]], list[str]]:
    """GNU ``getopt``: returns ``([(opt, arg)], operands)``; options may follow operands.

    ``optstring`` is as in C (``"bCl:pP:qs:v"``).  Raises :class:`GetoptError` with glibc's
    message (``read: invalid option -- 'Z'``).
    """
    opts: list[tuple[str, str]] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if word == "--":
            operands.extend(args[i:])
            break
        if not word.startswith("-") or word == "-":
            operands.append(word)
            continue
        j = 1
        while j < len(word):
            ch = word[j]
            pos = optstring.find(ch)
            if ch == ":" or pos < 0:
                raise GetoptError(f"{prog}: invalid option -- '{ch}'")
            if optstring[pos + 1:pos + 2] == ":":
                if j + 1 < len(word):
                    opts.append((ch, word[j + 1:]))
                elif i < len(args):
                    opts.append((ch, args[i]))
                    i += 1
                else:
                    raise GetoptError(f"{prog}: option requires an argument -- '{ch}'")
                break
            opts.append((ch, ""))
            j += 1
    return opts, operands


def parse_count(text: str, out: TextIO) -> int | None:
    """A size operand as qemu-io's ``cvtnum``; prints qemu-io's parse error and returns None."""
    try:
        return parse_size(text)
    except SizeError as e:
        what = "argument too large" if e.too_large else \
            "non-numeric argument, or extraneous/unrecognized suffix"
        out.write(f"Parsing error: {what} -- {text}\n")
        return None


_STRTOL = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")


def _parse_pattern(text: str, out: TextIO) -> int | None:
    """A pattern byte as C ``strtol(text, 0)``: decimal, 0x hex or 0 octal, 0..255."""
    m = _STRTOL.match(text)
    value = -1
    if m:
        digits = m.group(2)
        if digits[:2].lower() == "0x":
            value = int(digits[2:], 16)
        elif digits.startswith("0"):
            value = int(digits, 8)
        else:
            value = int(digits)
        if m.group(1) == "-":
            value = -value
    if not 0 <= value <= 255:
        out.write(f"{text} is not a valid pattern byte\n")
        return None
    return value


@dataclass(frozen=True)
class Command:
    """One qemu-io command: ``func(session, args) -> bool``; ``argmin``/``argmax`` count the words
    after the command name (options included; -1 = unlimited), checked before ``func`` runs."""

    name: str
    func: Callable[["Session", list[str]], bool]
    argmin: int
    argmax: int
    args: str
    oneline: str
    altname: str | None = None
    writes: bool = False

    @property
    def usage(self) -> str:
        return f"{self.name} {self.args} -- {self.oneline}"


class Session:
    """Runs qemu-io commands on one open image (anything with ``size`` and ``readinto``)."""

    def __init__(self, image, out: TextIO | None = None, err: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.image = image
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.clock = clock
        self.failed = False

    # -- running --------------------------------------------------------------------------------
    def run(self, line: str) -> bool:
        """Run one command line; returns its success (and records failures in ``failed``)."""
        words = line.split()
        if not words:
            return True
        cmd = find_command(words[0])
        if cmd is None:
            self.err.write(f'command "{words[0]}" not found\n')
            self.failed = True
            return False
        args = words[1:]
        if len(args) < cmd.argmin or (cmd.argmax >= 0 and len(args) > cmd.argmax):
            if cmd.argmax < 0:
                expected = f"at least {cmd.argmin}"
            elif cmd.argmin == cmd.argmax:
                expected = str(cmd.argmin)
            else:
                expected = f"between {cmd.argmin} and {cmd.argmax}"
            self.err.write(f"bad argument count {len(args)} to {cmd.name}, "
                           f"expected {expected} arguments\n")
            self.failed = True
            return False
        ok = cmd.func(self, args)
        if not ok:
            self.failed = True
        return ok

    def usage(self, cmd_name: str) -> bool:
        """Print a command's usage line (stdout, as qemu-io) and fail."""
        self.out.write(find_command(cmd_name).usage + "\n")
        return False

    # -- output helpers -------------------------------------------------------------------------
    def report(self, op: str, elapsed: float, offset: int, count: int, total: int, ops: int,
               machine: bool) -> None:
        """qemu-io's statistics: two human lines, or one CSV line with ``machine`` (-C)."""
        rate_bytes = total / elapsed if elapsed > 0 else 0.0
        rate_ops = ops / elapsed if elapsed > 0 else 0.0
        if machine:
            self.out.write("%d,%d,%s,%.3f,%.3f\n" % (total, ops, format_io_time(elapsed, True),
                                                     rate_bytes, rate_ops))
            return
        self.out.write(f"{op} {count}/{total} bytes at offset {offset}\n")
        self.out.write("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n" % (
            format_io_size(total), ops, format_io_time(elapsed), format_io_size(rate_bytes),
            rate_ops))

    def dump(self, data, offset: int) -> None:
        """qemu-io's ``-v`` hex dump: 16 bytes a line, offset, hex, and the alphanumerics."""
        lines = []
        view = bytes(data)
        for pos in range(0, len(view), 16):
            chunk = view[pos:pos + 16]
            hexes = "".join("%02x " % b for b in chunk)
            text = chunk.decode("latin-1").translate(_DUMP_TEXT)
            lines.append("%08x:  %s %s\n" % (offset + pos, hexes, text))
        self.out.write("".join(lines))


_DUMP_TEXT = {b: (chr(b) if chr(b).isascii() and chr(b).isalnum() else ".") for b in range(256)}


def _check_request(session: Session, offset: int, count: int) -> str | None:
    size = session.image.size
    if offset < 0 or count < 0 or offset > size or count > size - offset:
        return "Input/output error"
    return None


def _options(session: Session, args: list[str], optstring: str, name: str):
    """``getopt`` for command ``name``: ``(opts, operands)``, or None after an option error
    (glibc's message on stderr, the usage line on stdout, as qemu-io)."""
    try:
        return getopt(args, optstring, name)
    except GetoptError as e:
        session.err.write(f"{e}\n")
        session.usage(name)
        return None


def _offset_and_count(session: Session, name: str, operands: list[str],
                      limit_note: str | None = "") -> tuple[int, int] | None:
    """The ``off len`` operands of command ``name`` as sizes, or None after qemu-io's message
    (usage, parse error, or a length over :data:`REQUEST_MAX_BYTES` followed by ``limit_note``;
    ``limit_note=None``: no limit)."""
    if len(operands) != 2:
        session.usage(name)
        return None
    offset = parse_count(operands[0], session.out)
    if offset is None:
        return None
    count = parse_count(operands[1], session.out)
    if count is None:
        return None
    if limit_note is not None and count > REQUEST_MAX_BYTES:
        session.out.write(f"length cannot exceed {REQUEST_MAX_BYTES}{limit_note}, "
                          f"given {operands[1]}\n")
        return None
    return offset, count


def _cmd_read(session: Session, args: list[str]) -> bool:
    out = session.out
    parsed = _options(session, args, "bCl:pP:qs:v", "read")
    if parsed is None:
        return False
    opts, operands = parsed
    machine = quiet = verbose = vmstate = False
    pattern = None
    pattern_offset = 0
    pattern_count = None
    lflag = sflag = False
    for opt, arg in opts:
        if opt == "b":
            vmstate = True
        elif opt == "C":
            machine = True
        elif opt == "l":
            lflag = True
            pattern_count = parse_count(arg, out)
            if pattern_count is None:
                return False
        elif opt == "P":
            pattern = _parse_pattern(arg, out)
            if pattern is None:
                return False
        elif opt == "q":
            quiet = True
        elif opt == "s":
            sflag = True
            pattern_offset = parse_count(arg, out)
            if pattern_offset is None:
                return False
        elif opt == "v":
            verbose = True
        # "p" is accepted and ignored, as qemu-io does
    if pattern is None and (lflag or sflag):
        return session.usage("read")
    numbers = _offset_and_count(session, "read", operands)
    if numbers is None:
        return False
    offset, count = numbers
    if vmstate:
        out.write("read failed: Operation not supported\n")
        return False
    if pattern_count is None:
        pattern_count = count - pattern_offset
    if pattern_count < 0 or pattern_offset + pattern_count > count:
        out.write("pattern verification range exceeds end of read data\n")
        return False

    problem = _check_request(session, offset, count)
    buf = bytearray(count if problem is None else 0)
    start = session.clock()
    if problem is None:
        try:
            session.image.readinto(buf, offset)
        except Qcow2Error as e:   # qemu reports EIO; keep the detail on stderr
            session.err.write(f"{e}\n")
            problem = "Input/output error"
    elapsed = session.clock() - start
    if problem is not None:
        out.write(f"read failed: {problem}\n")
        return False
    ok = True
    if pattern is not None:
        region = memoryview(buf)[pattern_offset:pattern_offset + pattern_count]
        if region != bytes([pattern]) * pattern_count:
            out.write(f"Pattern verification failed at offset {offset + pattern_offset}, "
                      f"{pattern_count} bytes\n")
            ok = False
    if quiet:
        return ok
    if verbose:
        session.dump(buf, offset)
    session.report("read", elapsed, offset, count, count, 1, machine)
    return ok


def _failure(session: Session, op: str, e: Exception) -> bool:
    """qemu-io's ``<op> failed: <errno text>`` on stdout; our detail goes to stderr."""
    if isinstance(e, ReadOnlyError):
        session.err.write("qcow2-tool: Block node is read-only\n")
        return False
    if isinstance(e, UnsupportedError):
        reason = "Operation not supported"
    elif isinstance(e, _InvalidArgument):
        reason = "Invalid argument"
    else:
        reason = "Input/output error"
        session.err.write(f"{e}\n")
    session.out.write(f"{op} failed: {reason}\n")
    return False


class _InvalidArgument(RequestError):
    """A request the block layer refuses with EINVAL (a compressed write not cluster aligned)."""


def _write_buffer(session: Session, count: int, pattern: int, source: str | None):
    """The bytes ``write`` writes: the pattern byte, or the pattern file repeated (None and a
    message on stderr when the file cannot be read or is empty)."""
    if source is None:
        return bytes([pattern]) * count
    try:
        with open(source, "rb") as f:      # the pattern file is only read
            chunk = f.read(count)
    except OSError as e:
        session.err.write(f"{source}: {e.strerror}\n")
        return None
    if not chunk:
        session.err.write(f"{source}: file is empty\n")
        return None
    return (chunk * (count // len(chunk) + 1))[:count]


def _cmd_write(session: Session, args: list[str]) -> bool:
    out = session.out
    parsed = _options(session, args, "bcCfnpP:qs:uz", "write")
    if parsed is None:
        return False
    opts, operands = parsed
    flags = {opt for opt, _ in opts}
    pattern = 0xCD
    source = None
    for opt, arg in opts:
        if opt == "P":
            value = _parse_pattern(arg, out)
            if value is None:
                return False
            pattern = value
        elif opt == "s":
            source = arg
    zero = "z" in flags
    if zero + ("P" in flags) + ("s" in flags) > 1:
        out.write("Only one of -z, -P, and -s can be specified at the same time\n")
        return False
    if "b" in flags and zero:
        out.write("-b and -z cannot be specified at the same time\n")
        return False
    for flag in "nu":
        if flag in flags and not zero:
            out.write(f"-{flag} requires -z to be specified\n")
            return False
    numbers = _offset_and_count(session, "write", operands,
                                None if "n" in flags else " without -n")
    if numbers is None:
        return False
    offset, count = numbers
    if ("b" in flags or "c" in flags) and not zero:
        for name, value in (("offset", offset), ("count", count)):
            if value % 512:
                out.write(f"{value} is not a sector-aligned value for '{name}'\n")
                return False
    buf = b"" if zero else _write_buffer(session, count, pattern, source)
    if buf is None:
        return False
    img = session.image
    start = session.clock()
    try:
        if "b" in flags:
            raise UnsupportedError("writing the VM state is not supported")
        if _check_request(session, offset, count) is not None:
            raise RequestError(f"write of {count} bytes at offset {offset} is outside the image")
        if zero:
            img.write_zeroes(offset, count, may_unmap="u" in flags, no_fallback="n" in flags)
        elif "c" in flags:
            _write_compressed(img, buf, offset)
        else:
            img.pwrite(buf, offset)
        if "f" in flags:
            img.flush()
    except Qcow2Error as e:
        return _failure(session, "write", e)
    elapsed = session.clock() - start
    if "q" not in flags:
        session.report("wrote", elapsed, offset, count, count, 1, "C" in flags)
    return True


def _write_compressed(img, buf: bytes, offset: int) -> None:
    """``write -c``: whole clusters (or up to the end of the disk) into unallocated clusters only,
    as QEMU's compressed writes (EINVAL when misaligned, EIO over allocated clusters)."""
    if not buf:
        return
    cs = img.cluster_size
    if offset % cs or (len(buf) % cs and offset + len(buf) != img.size):
        raise _InvalidArgument(f"compressed write not cluster aligned: offset {offset}, "
                               f"length {len(buf)}")
    img.write_compressed(buf, offset, overwrite=False)


def _cmd_discard(session: Session, args: list[str]) -> bool:
    parsed = _options(session, args, "Cq", "discard")
    if parsed is None:
        return False
    opts, operands = parsed
    flags = {opt for opt, _ in opts}
    numbers = _offset_and_count(session, "discard", operands)
    if numbers is None:
        return False
    offset, count = numbers
    start = session.clock()
    try:
        if _check_request(session, offset, count) is not None:
            raise RequestError(f"discard of {count} bytes at offset {offset} is outside the image")
        session.image.discard(offset, count)
    except Qcow2Error as e:
        return _failure(session, "discard", e)
    elapsed = session.clock() - start
    if "q" not in flags:
        session.report("discard", elapsed, offset, count, count, 1, "C" in flags)
    return True


def _cmd_flush(session: Session, args: list[str]) -> bool:
    try:
        session.image.flush()
    except Qcow2Error as e:
        return _failure(session, "flush", e)
    return True


COMMANDS: list[Command] = [
    Command("read", _cmd_read, 2, -1, "[-abCqv] [-P pattern [-s off] [-l len]] off len",
            "reads a number of bytes at a specified offset", altname="r"),
    Command("write", _cmd_write, 2, -1, "[-bcCfnquz] [-P pattern | -s source_file] off len",
            "writes a number of bytes at a specified offset", altname="w", writes=True),
    Command("discard", _cmd_discard, 2, -1, "[-Cq] off len",
            "discards a number of bytes at a specified offset", altname="d", writes=True),
    Command("flush", _cmd_flush, 0, 0, "", "flush all in-core file state to disk"),
    Command("aio_flush", _cmd_flush, 0, 0, "", "completes all outstanding aio requests"),
]


def find_command(word: str) -> Command | None:
    """The command named (or aliased) ``word``, or None."""
    for cmd in COMMANDS:
        if word == cmd.name or word == cmd.altname:
            return cmd
    return None


def command_writes(line: str) -> bool:
    """Whether a command line needs the image open read-write."""
    words = line.split()
    cmd = find_command(words[0]) if words else None
    return bool(cmd and cmd.writes)
