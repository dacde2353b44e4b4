"""The output file of an annotation job: JSON lines written so that each answer lands exactly once.

Rules that make a crashed job safe to rerun:

- A record counts once it is on disk: one `write` of the whole line on an O_APPEND descriptor,
  then `fsync`. Only the job's driver writes (workers, Ray tasks and actors never do).
- A line ends with its newline, the last byte written, so a job killed mid-write leaves a last
  line without one. Opening the log truncates such a torn tail away; any other line that is not
  a JSON record is refused (it is not ours to fix).
- One record per id. A plain rerun skips ok and error records alike; `--retry-failed` appends a
  new record for an error id, and the log then rewrites itself keeping the last record per id
  (a temporary file, fsync, atomic rename) when the job ends, or when the next job opens it if
  this one was killed first. Until then, a reader of a file from a killed retry takes the last
  record per id.
- One job per output file at a time: a lock on `FILE.lock`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from kernels.errors import VidsieveError

STATUSES = ("ok", "error")
_ID_PATTERN = re.compile(r"[0-9a-f]{16}")  # what `record_key` makes
_TAIL_SCAN_BYTES = 1 << 16


class AnnotationLogError(VidsieveError):
    """The output file is in use by another job or holds lines that are not annotation records."""


class AnnotationLog:
    """Open with `with AnnotationLog(path) as log:`; read `statuses`, then `append` records."""

    def __init__(self, path: Path, *, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self.statuses: dict[str, str] = {}  # record id -> "ok" | "error", the latest record's
        self._written: set[str] = set()  # ids appended by this job
        self._replaced = 0  # appended records whose id already had one
        self._lock_fd = self._fd = -1

    def __enter__(self) -> "AnnotationLog":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(f"{self.path}.lock", os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as error:
            raise AnnotationLogError(f"cannot write next to {str(self.path)!r}: {error.strerror or error}") from None
        try:
            # A POSIX lock belongs to this process alone: forked decode workers do not hold it,
            # and it is gone the moment a killed job is.
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(self._lock_fd)
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise AnnotationLogError(f"another annotate job is writing {str(self.path)!r}; "
                                     "wait for it or choose another --out") from None
        try:
            self._open_for_appending()
        except BaseException:
            os.close(self._lock_fd)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self._fd)
        if self._replaced:
            self._compact()
        os.close(self._lock_fd)  # releases the lock

    def ids_with_status(self, status: str) -> list[str]:
        return [record_id for record_id, seen in self.statuses.items() if seen == status]

    def written(self, record_id: str) -> bool:
        """Whether this job already appended a record with this id (the same content twice)."""
        return record_id in self._written

    def append(self, record: dict) -> None:
        """Append one record as one line, durably: it counts once this returns."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        written = 0
        while written < len(line):  # a regular file writes whole; loop only for short writes
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)
        record_id = record["id"]
        if record_id in self.statuses:
            self._replaced += 1
        self.statuses[record_id] = record["status"]
        self._written.add(record_id)

    # --- reading and repairing ---------------------------------------------------------------

    def _open_for_appending(self) -> None:
        if self.overwrite:
            self.path.unlink(missing_ok=True)
        dropped = self._repair_torn_tail()
        if dropped:
            print(f"vidsieve: repaired {self.path}: dropped a torn last line ({dropped} bytes) "
                  "left by a job that was killed mid-write", file=sys.stderr)
        duplicates = self._read_statuses()
        if duplicates:
            self._compact()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fsync_folder(self.path.parent)  # the file's name is durable too, not only its bytes

    def _repair_torn_tail(self) -> int:
        """Truncate the file after its last newline; returns how many bytes were dropped."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            end = size
            while end > 0:
                start = max(0, end - _TAIL_SCAN_BYTES)
                handle.seek(start)
                newline = handle.read(end - start).rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
            if end == size:
                return 0
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
        return size - end

    def _records(self) -> Iterator[tuple[bytes, dict]]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    record = None
                if not (isinstance(record, dict) and isinstance(record.get("id"), str)
                        and _ID_PATTERN.fullmatch(record["id"]) and record.get("status") in STATUSES):
                    raise AnnotationLogError(f"{str(self.path)!r} line {number} is not an annotation record; "
                                             "not appending to it (choose another --out, or --overwrite)")
                yield line, record

    def _read_statuses(self) -> int:
        """Fill `statuses` from the file; returns how many records an id's later record replaces."""
        duplicates = 0
        for _, record in self._records():
            duplicates += record["id"] in self.statuses
            self.statuses[record["id"]] = record["status"]
        return duplicates

    def _compact(self) -> None:
        """Rewrite the file keeping only the last record per id, in the order they were written."""
        latest: dict[str, bytes] = {}
        for line, record in self._records():
            latest.pop(record["id"], None)
            latest[record["id"]] = line
        temporary = self.path.with_name(self.path.name + ".compacting")
        with open(temporary, "wb") as handle:
            handle.writelines(latest.values())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        _fsync_folder(self.path.parent)
        self._replaced = 0


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
