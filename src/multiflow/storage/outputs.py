"""Where multiflow writes, and the promises it keeps there.

- An output never is, sits in, or holds an input: a folder output that is, contains or is
  contained by the model folder (symlinks resolved) is refused, and so is a file output inside it.
- Nothing is replaced unless asked (`overwrite`), and a folder only when it is empty or a previous
  multiflow output (it holds `multiflow_report.json`): never a folder the tool did not create.
- Files appear whole or not at all (a temporary file beside the target, then a rename); a checkpoint
  folder is built in a marked temporary folder beside `--output` and renamed into place only if
  `--output` is still what was checked. A folder that appeared meanwhile is left alone and the result
  kept. Interrupted runs remove their temporary folder; those of a killed run are removed by the
  next run into the same `--output`.
- Write failures (read-only or full disk) are one-line errors naming the path.
- Files and folders get the modes the umask gives (0o666 / 0o777 less the umask).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from multiflow.errors import MultiflowError

log = logging.getLogger("multiflow")

REPORT_NAME = "multiflow_report.json"  # what makes a folder a previous multiflow output
MARKER_NAME = ".multiflow-tmp"  # inside a temporary output folder: who is writing it
_TEMP = re.compile(r"\.(?P<name>.+)\.multiflow-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+")

# {what it is, e.g. "the input model folder": its path or None}: paths an output must keep clear of
Inputs = Mapping[str, "str | os.PathLike | None"]


def output_path(value: str | os.PathLike | None, flag: str = "--output") -> Path:
    """`value` as a path; an empty value (an unset shell variable) is an error, never the current folder."""
    if value is None or not os.fspath(value).strip():
        raise MultiflowError(f"{flag} is empty (an unset shell variable?): give a path")
    return Path(value)


def umask() -> int:
    """The process umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def write_error(path: Path, exc: OSError, temporary: Path | None = None) -> MultiflowError:
    """A failed write as one line naming the path (read-only or full disk, missing permission);
    a file in the (removed) `temporary` folder is named by its place in `path`."""
    reason = exc.strerror or str(exc)
    if temporary is not None and exc.filename and Path(exc.filename).is_relative_to(temporary):
        exc.filename = str(path / Path(exc.filename).relative_to(temporary))
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
            errno.EROFS: "write to a writable file system", errno.EACCES: "check the permissions",
            errno.EPERM: "check the permissions"}.get(exc.errno, "choose another place")
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return MultiflowError(f"cannot write {path}: {reason}{where}; {hint}; nothing was left there")


# ---------------------------------------------------------------------------------------------- checks

def _resolved_inputs(inputs: Inputs) -> list[tuple[str, Path, Path]]:
    return [(what, Path(p), Path(p).resolve()) for what, p in inputs.items()
            if isinstance(p, (str, os.PathLike)) and os.fspath(p)]  # e.g. rules given as an object: no path


def _inside(path: Path, folder: Path) -> bool:
    return folder in path.parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_file_output(path: Path, inputs: Inputs, overwrite: bool, flag: str = "--output",
                      example: str | None = None) -> None:
    """Refuse a file output that is a folder, sits inside an input folder, is an input file, or exists
    (unless `overwrite`)."""
    path = Path(path)
    if path.is_dir():
        hint = f"; give a file name such as {path / example}" if example else "; give a file name"
        raise MultiflowError(f"{flag} {path} is a folder{hint}")
    real = path.resolve()
    for what, p, rp in _resolved_inputs(inputs):
        if rp.is_dir() and (_inside(real, rp) or (path.exists() and any(_same_file(path, f) for f in _files_in(rp)))):
            raise MultiflowError(f"{flag} {path} is inside {what} {p}: multiflow never writes into an input "
                                 "(files there may be read as part of it); write it elsewhere")
        if not rp.is_dir() and (real == rp or _same_file(path, rp)):
            raise MultiflowError(f"{flag} {path} is {what}; write the output elsewhere")
    parent = next((q for q in real.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise MultiflowError(f"{flag} {path}: {parent} is a file, not a folder")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise MultiflowError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another name")


def _files_in(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_file()]
    except OSError:
        return []


@dataclass(frozen=True)
class _State:
    """What a folder output looked like when checked: absent, empty, a previous output, or other."""

    kind: str  # absent | empty | previous | other | file | symlink
    device: int = 0
    inode: int = 0
    report: str = ""  # sha256 of a previous output's report


def _state(path: Path) -> _State:
    if path.is_symlink():
        return _State("symlink")
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return _State("absent")
    if not path.is_dir():
        return _State("file", st.st_dev, st.st_ino)
    names = {p.name for p in path.iterdir()}
    if not names:
        return _State("empty", st.st_dev, st.st_ino)
    report = path / REPORT_NAME
    if REPORT_NAME in names and report.is_file() and not report.is_symlink():
        try:
            raw = report.read_bytes()
            if json.loads(raw).get("tool") == "multiflow":
                return _State("previous", st.st_dev, st.st_ino, hashlib.sha256(raw).hexdigest())
        except (OSError, ValueError, AttributeError):
            pass
    return _State("other", st.st_dev, st.st_ino)


def check_folder_output(output: Path, inputs: Inputs, overwrite: bool, flag: str = "--output") -> _State:
    """Refuse a folder output that would touch an input or replace what multiflow did not create;
    return what it looked like, for `FolderOutput` to compare against at the end."""
    output = Path(output)
    if output.name in ("", ".", ".."):
        raise MultiflowError(f"{flag} {output}: give the folder by its name (not '.', '..' or '/')")
    real = output.resolve()
    for what, p, rp in _resolved_inputs(inputs):
        if real == rp:
            raise MultiflowError(f"{flag} {output} is {what} {p}; write the pruned copy to a new folder")
        if _inside(real, rp):
            raise MultiflowError(f"{flag} {output} is inside {what} {p}; write the pruned copy elsewhere")
        if _inside(rp, real) and output.exists():
            raise MultiflowError(f"{flag} {output} contains {what} {p}; replacing it would delete the input: "
                                 "write the pruned copy to a new folder")
    try:
        cwd = Path.cwd().resolve()
        if output.exists() and (real == cwd or _inside(cwd, real)):
            raise MultiflowError(f"{flag} {output} is or contains the current folder; give a new folder name")
        state = _state(output)
    except OSError as exc:
        raise MultiflowError(f"cannot read {flag} {output}: {exc.strerror or exc}") from None
    if state.kind == "symlink":
        raise MultiflowError(f"{flag} {output} is a symbolic link (to {os.readlink(output)}); give a folder path "
                             "that is not a link")
    if state.kind == "file":
        raise MultiflowError(f"{flag} {output} is a file; give a folder (it must be new, empty, or a previous "
                             "multiflow output with --overwrite)")
    if state.kind == "other":
        raise MultiflowError(f"{flag} {output} is not empty and holds no {REPORT_NAME}, so multiflow did not "
                             "create it; it is never replaced (not even with --overwrite): choose a new or empty "
                             "folder")
    if state.kind == "previous" and not overwrite:
        raise MultiflowError(f"{flag} {output} holds a previous multiflow output; pass --overwrite to replace it, "
                             "or choose another folder")
    return state


# ---------------------------------------------------------------------------------------------- files

def write_atomic(path: str | os.PathLike, content: str | bytes, overwrite: bool = True) -> Path:
    """Write to a temporary file beside `path`, then rename: no partial file on failure.

    `overwrite=False`: an existing `path` (even one that appears while writing) is an error.
    Write failures raise MultiflowError naming the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(content.encode() if isinstance(content, str) else content)
        _place(Path(tmp), path, overwrite)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    return path


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename tmp to path; without overwrite, never over an existing file (hard link, which fails if it exists)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise MultiflowError(f"{path} exists (it appeared while multiflow was writing); not replaced: "
                             "pass --overwrite or choose another name") from None
    except OSError:  # no hard links on this file system: check, then rename
        if path.exists() or path.is_symlink():
            raise MultiflowError(f"{path} exists; pass --overwrite to replace it, or choose another name") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextmanager
def files_together(paths: list[Path], overwrite: bool) -> Iterator[list[Path]]:
    """Temporary paths beside `paths` to write to; when the block ends without error they are all
    renamed into place, else all removed (no JSON without its chart). A failure while renaming
    removes the files already placed."""
    temps: list[Path] = []
    placed: list[Path] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        for tmp, path in zip(temps, paths):
            os.chmod(tmp, file_mode())
            _place(tmp, path, overwrite)
            placed.append(path)
    except BaseException as exc:
        for p in [*temps, *placed]:
            p.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(paths[len(placed)] if len(placed) < len(paths) else paths[-1], exc) from None
        raise


# ---------------------------------------------------------------------------------------------- folders

class FolderOutput:
    """A folder output built in a temporary folder beside it and renamed into place at the end.

    Construction checks `output` (see `check_folder_output`); `building()` yields the temporary
    folder and installs it when the block ends without error, or removes it on any error,
    interruption included. Installing replaces `output` only if it is still what was checked.
    """

    def __init__(self, output: str | os.PathLike, inputs: Inputs, overwrite: bool, flag: str = "--output"):
        self.output = output_path(output, flag)
        self.flag = flag
        if not self.output.is_symlink():
            clean_leftovers(self._real)  # first: a killed run may have set a previous output aside
        self.checked = check_folder_output(self.output, inputs, overwrite, flag)

    @property
    def _real(self) -> Path:  # where to work: output's real parent (output itself is no link)
        return self.output.parent.resolve() / self.output.name

    @contextmanager
    def building(self) -> Iterator[Path]:
        """The temporary folder to write into; moved into place when the block ends without error."""
        target = self._real
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _new_name(target, "tmp")
            os.mkdir(tmp, 0o777)  # the umask applies
            (tmp / MARKER_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                        "output": str(target)}) + "\n")
        except OSError as exc:
            raise write_error(self.output, exc) from None
        try:
            yield tmp
            self._install(tmp)
        except _Kept:
            raise
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise write_error(self.output, exc, tmp) from None
            raise

    def _install(self, tmp: Path) -> None:
        target = self._real
        (tmp / MARKER_NAME).unlink()  # a kept result must not look like a leftover
        now = _state(target)
        if now != self.checked:
            raise _Kept(f"{self.flag} {self.output} changed while multiflow was writing "
                                 f"({_describe(self.checked)} then, {_describe(now)} now); it was left as it is, "
                                 f"and the finished result is in {tmp}")
        try:
            if now.kind == "absent":
                os.rename(tmp, target)  # fails if a non-empty folder appeared just now
            elif now.kind == "empty":
                os.rmdir(target)  # fails if something appeared in it just now
                os.rename(tmp, target)
            else:  # a previous output: set it aside, move the new one in, then delete the old one
                old = _new_name(target, "old")
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old, target)
                    raise
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            raise _Kept(f"{self.flag} {self.output} could not be replaced ({exc.strerror or exc}); "
                                 f"the finished result is in {tmp}") from None


class _Kept(MultiflowError):
    """Installing failed after the result was finished: the temporary folder is kept and named."""


def _describe(state: _State) -> str:
    return {"absent": "absent", "empty": "an empty folder", "previous": "a previous multiflow output",
            "other": "a folder multiflow did not create", "file": "a file", "symlink": "a symbolic link"}[state.kind]


def _new_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.multiflow-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_leftovers(target: Path) -> list[Path]:
    """Remove the temporary folders that a killed run into `target` left beside it (its marker names a
    process of this host that is gone); put back a previous output that a killed run had set aside.
    Returns what was removed."""
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = _TEMP.fullmatch(path.name)
        if match and match["name"] == target.name and path.is_dir() and not path.is_symlink():
            try:
                if _clean_one(path, int(match["pid"]), match["kind"], target):
                    removed.append(path)
            except OSError as exc:  # e.g. no permission: leave it
                log.warning("could not clean up %s: %s", path, exc.strerror or exc)
    return removed


def _clean_one(path: Path, pid: int, kind: str, target: Path) -> bool:
    """Clean one leftover beside `target`; True when it was removed."""
    if kind == "tmp":
        try:
            marker = json.loads((path / MARKER_NAME).read_text())
        except (OSError, ValueError):
            return False  # not marked: not ours to delete
        if not isinstance(marker, dict) or marker.get("host") != socket.gethostname() or marker.get("pid") != pid:
            return False
        if _alive(pid):
            log.warning("another multiflow run (pid %d) is writing to %s; the first to finish wins", pid, target)
            return False
        shutil.rmtree(path)
        log.warning("removed %s: the temporary folder of an interrupted multiflow run (pid %d) into %s",
                    path, pid, target)
        return True
    if _alive(pid) or not (path / REPORT_NAME).is_file():
        return False
    now = _state(target).kind
    if now == "previous":  # the new output was moved in; the old one was not deleted yet
        shutil.rmtree(path)
        log.warning("removed %s: the previous output that an interrupted multiflow run (pid %d) had replaced",
                    path, pid)
        return True
    if now == "absent":  # killed between the two renames: put the old output back
        os.rename(path, target)
        log.warning("restored %s from %s, where an interrupted multiflow run (pid %d) had set it aside",
                    target, path, pid)
    return False
