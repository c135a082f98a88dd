"""The download queue: resumable, verified, landing in the Hugging Face cache layout.

huggingface_hub checks a file's size but not its sha256, and its partial files are per
process, so lmx fetches the bytes itself: a partial file that survives restarts (resumed with
an HTTP Range), a sha256 check against the hub's LFS metadata, then an atomic rename into
`blobs/` and the `snapshots/<commit>/<file>` link that huggingface_hub and other tools read.
Nothing unverified is ever visible as a model.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from server.hub import endpoint

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RETRIES = 3
ACTIVE = ("queued", "running", "paused")


@dataclass
class Download:
    """One file being fetched."""

    id: str
    repo: str
    filename: str
    sha256: str
    size: int
    commit: str
    state: str = "queued"  # queued, running, paused, done, failed, cancelled
    done: int = 0
    rate: float = 0.0
    error: str | None = None
    created: float = field(default_factory=time.time)

    @property
    def eta(self) -> float | None:
        if self.rate <= 0 or self.state != "running":
            return None
        return (self.size - self.done) / self.rate

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "eta": self.eta}


class DownloadQueue:
    """FIFO downloads, `concurrency` at a time, persisted in `state_file`."""

    def __init__(
        self,
        cache_dir: Path,
        state_file: Path,
        *,
        concurrency: int = 2,
        on_event: Callable[[str, Download], None] | None = None,
        on_installed: Callable[[Download], None] | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.state_file = state_file
        self.concurrency = concurrency
        self.on_event = on_event or (lambda kind, d: None)
        # Called once the file is in place and before the job says "done", so that whoever
        # sees "done" also finds the model.
        self.on_installed = on_installed or (lambda d: None)
        self._jobs: dict[str, Download] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._load()

    # ----- state ---------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            rows = json.loads(self.state_file.read_text("utf-8"))
        except (OSError, ValueError):
            return
        for row in rows:
            d = Download(**{k: v for k, v in row.items() if k in Download.__dataclass_fields__})
            if d.state == "running":
                d.state = "queued"  # interrupted by a restart: it resumes from its partial
            d.done = self._partial(d).stat().st_size if self._partial(d).exists() else d.done
            d.rate = 0.0
            self._jobs[d.id] = d

    def _save(self) -> None:
        rows = [asdict(d) for d in self._jobs.values()]
        tmp = self.state_file.with_suffix(".tmp")
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(rows, indent=1), "utf-8")
            os.replace(tmp, self.state_file)
        except OSError as e:
            # A full disk must not kill the worker mid-update: the queue in memory is right,
            # the file keeps its last whole version, and no half-written copy is left.
            tmp.unlink(missing_ok=True)
            log.warning("cannot save the download queue to %s: %s", self.state_file, e)

    def _set(self, d: Download, state: str, error: str | None = None) -> None:
        with self._cond:
            d.state, d.error = state, error
            self._save()
            self._cond.notify_all()
        self.on_event(state, d)

    def _repo_dir(self, repo: str) -> Path:
        from huggingface_hub.file_download import repo_folder_name

        return self.cache_dir / repo_folder_name(repo_id=repo, repo_type="model")

    def _blob(self, d: Download) -> Path:
        return self._repo_dir(d.repo) / "blobs" / d.sha256

    def _partial(self, d: Download) -> Path:
        return self._repo_dir(d.repo) / "blobs" / f"{d.sha256}.lmx-partial"

    def snapshot_path(self, d: Download) -> Path:
        return self._repo_dir(d.repo) / "snapshots" / d.commit / d.filename

    # ----- requests ------------------------------------------------------------------------

    def add(self, repo: str, filename: str, sha256: str, size: int, commit: str) -> Download:
        """Queue a file; the same file asked for twice is fetched once. A finished job counts
        only while its file is still there (`lmx rm` then `lmx pull` fetches it again)."""
        with self._cond:
            for d in self._jobs.values():
                if d.repo == repo and d.filename == filename and d.sha256 == sha256:
                    if d.state in ACTIVE:
                        return d
                    if d.state == "done" and self.snapshot_path(d).exists():
                        return d
            d = Download(uuid.uuid4().hex[:12], repo, filename, sha256, size, commit)
            self._jobs[d.id] = d
            self._save()
            self._cond.notify_all()
        self.on_event("queued", d)
        self.start()
        return d

    def get(self, job_id: str) -> Download:
        with self._cond:
            if job_id not in self._jobs:
                raise KeyError(job_id)
            return self._jobs[job_id]

    def list(self) -> list[Download]:
        with self._cond:
            return sorted(self._jobs.values(), key=lambda d: d.created)

    def cancel(self, job_id: str) -> Download:
        """Stop and forget the partial bytes (a running job's worker removes them)."""
        d = self.get(job_id)
        was = d.state
        if was in ACTIVE:
            self._set(d, "cancelled")
            if was != "running":
                with contextlib.suppress(OSError):
                    self._partial(d).unlink(missing_ok=True)
        return d

    def pause(self, job_id: str) -> Download:
        d = self.get(job_id)
        if d.state in ("queued", "running"):
            self._set(d, "paused")
        return d

    def resume(self, job_id: str) -> Download:
        d = self.get(job_id)
        if d.state in ("paused", "failed"):
            self._set(d, "queued")
        return d

    # ----- workers -------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            self._threads = [t for t in self._threads if t.is_alive()]
            while len(self._threads) < self.concurrency and not self._stopping:
                t = threading.Thread(target=self._work, name="lmx-download", daemon=True)
                self._threads.append(t)
                t.start()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=10)

    def wait(self, job_id: str, timeout: float | None = None) -> Download:
        """Block until the job leaves the active states (CLI, tests)."""
        d = self.get(job_id)
        with self._cond:
            self._cond.wait_for(lambda: d.state not in ("queued", "running"), timeout)
        return d

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not any(
                    d.state == "queued" for d in self._jobs.values()
                ):
                    self._cond.wait()
                if self._stopping:
                    return
                d = next(
                    d
                    for d in sorted(self._jobs.values(), key=lambda d: d.created)
                    if d.state == "queued"
                )
                d.state = "running"
                self._save()
            self.on_event("running", d)
            try:
                self._fetch(d)
            except Exception as e:  # every failure becomes a one-line error on the job
                log.warning("download %s failed: %s", d.filename, e)
                if d.state == "running":
                    self._set(d, "failed", str(e).splitlines()[0] if str(e) else repr(e))

    def _fetch(self, d: Download) -> None:
        blob, partial = self._blob(d), self._partial(d)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            have = partial.stat().st_size if partial.exists() else 0
            free = shutil.disk_usage(blob.parent).free
            if d.size - have > free:
                raise OSError(
                    f"not enough disk space for {d.filename}: needs "
                    f"{(d.size - have) / 1e6:.0f} MB more, {free / 1e6:.0f} MB free"
                )
            for attempt in range(RETRIES):
                try:
                    if self._stream(d, partial):
                        break
                    if d.state == "cancelled":
                        partial.unlink(missing_ok=True)
                    return  # paused or cancelled
                except (httpx.HTTPError, ConnectionError) as e:
                    if attempt == RETRIES - 1:
                        raise OSError(
                            f"the hub dropped the download of {d.filename} "
                            f"{RETRIES} times ({e.__class__.__name__}); it will "
                            "resume from where it stopped"
                        ) from e
                    time.sleep(0.5 * (attempt + 1))
            digest = _sha256(partial)
            if digest != d.sha256:
                partial.unlink(missing_ok=True)
                d.done = 0
                raise ValueError(
                    f"{d.filename} is corrupt: sha256 {digest[:12]}… does not match "
                    f"the hub's {d.sha256[:12]}…; the bytes were discarded"
                )
            os.replace(partial, blob)
        link = self.snapshot_path(d)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
        refs = self._repo_dir(d.repo) / "refs" / "main"
        refs.parent.mkdir(parents=True, exist_ok=True)
        refs.write_text(d.commit)
        d.done = d.size
        self.on_installed(d)
        self._set(d, "done")

    def _stream(self, d: Download, partial: Path) -> bool:
        """Append the rest of the file to `partial`; False if paused or cancelled."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

        have = partial.stat().st_size if partial.exists() else 0
        url = hf_hub_url(d.repo, d.filename, revision=d.commit, endpoint=endpoint())
        # The hub's own headers: the user's token (HF_TOKEN or `hf auth login`) for gated
        # repositories, and its user agent.
        headers = dict(build_hf_headers())
        if have:
            headers["Range"] = f"bytes={have}-"
        with httpx.stream(
            "GET", url, headers=headers, follow_redirects=True, timeout=httpx.Timeout(30, read=60)
        ) as r:
            if r.status_code == 416:  # already complete
                return True
            r.raise_for_status()
            if have and r.status_code != 206:
                have = 0  # the server ignored the range: start over
            mode = "ab" if have else "wb"
            t0, n0 = time.monotonic(), have
            try:
                with partial.open(mode) as out:
                    for chunk in r.iter_bytes(CHUNK):
                        if d.state != "running":
                            return False
                        out.write(chunk)
                        have += len(chunk)
                        d.done = have
                        dt = time.monotonic() - t0
                        if dt > 0.25:
                            d.rate = (have - n0) / dt
                            self.on_event("progress", d)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # The disk filled up mid-way: the partial file goes (it holds the space the
                # rest of the machine needs), and the job fails with one line.
                partial.unlink(missing_ok=True)
                d.done = 0
                free = shutil.disk_usage(partial.parent).free
                raise OSError(
                    f"the disk filled up while downloading {d.filename} "
                    f"({have / 1e6:.0f} of {d.size / 1e6:.0f} MB written, {free / 1e6:.0f} MB "
                    "free now); the partial file was removed"
                ) from e
        if d.state != "running":
            return False
        if have < d.size:
            raise httpx.RemoteProtocolError(f"connection closed at {have} of {d.size} bytes")
        return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
