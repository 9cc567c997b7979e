"""The labelling outputs training reads: the same on every rank, and optionally copied to each node's local disk.

Every rank first gathers the identity of each labelling output it reads (`distill.cache`, `distill.labels`): the
digest of the pass that wrote it, as its `class_means.json` and cache manifest record it. A folder that is another
pass's output, or missing, on some rank (a node-local path, a node with an old copy) ends the job on every rank with
one line naming those ranks and hosts, before any work.

With `distill.stage_dir` (environment variables in it are expanded by each process: `$TMPDIR/clipkd`, or
`$GROUP_RANK` to give each torchrun agent of one machine a folder of its own), local rank 0 of each node copies what
training reads of each output (the identity index, labels, class means and cache; not `identities.txt`, stats or
parts) to `STAGE_DIR/NAME-IDENTITY`, under a temporary name renamed once the copy is checked, so a crashed copy is
never taken for a complete one. The node's other ranks wait for it on the file system: they end with an error
naming the copy after `timeout` seconds in which its bytes did not grow. A copy is complete when its record
(`stage.json`, written last) names the output's identity, every file has the source's size, and its own
`class_means.json` and manifest carry the same digests: a later run reuses it without copying; a stale or
incomplete one is replaced. Then every rank reads the copy. Everything is on the file system except two
all-gathers of a few hundred bytes (identities, then each rank's outcome), so a rank whose copy failed does not
leave the others waiting in a collective.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

from clipkd_dino.config import DistillConfig
from clipkd_dino.engine.distributed import gathered_objects
from clipkd_dino.errors import UserError
from clipkd_dino.files import write_json_atomic

RECORD = "stage.json"  # written last into a copy: its identity and the size of every file
POLL_SECONDS = 0.2  # a waiting rank looks at its node's copy this often


def read_files(folder: Path) -> list[str]:
    """What training reads of a labelling output, relative to it: the identity index and sources, the labels, the
    class means and, when there is one, the teacher cache."""
    from clipkd_dino.data.identity import SampleIndex
    from clipkd_dino.teacher.cache import CACHE_DIR, MANIFEST
    from clipkd_dino.teacher.class_means import MEANS_FILE, SIDECAR_FILE
    from clipkd_dino.teacher.labels import LABEL_ARRAYS, LABELS_DIR, SAMPLES_DIR, SOURCES_FILE

    files = [f"{SAMPLES_DIR}/{name}" for name in (*SampleIndex.FILES, SOURCES_FILE)]
    files += [f"{LABELS_DIR}/{name}.npy" for name in LABEL_ARRAYS] + [MEANS_FILE, SIDECAR_FILE]
    if (folder / CACHE_DIR / MANIFEST).is_file():
        files += [f"{CACHE_DIR}/{name}" for name in ("images.npy", "texts.npy", "caption_offsets.npy", MANIFEST)]
    return files


def output_identity(folder: Path) -> str:
    """The digest (16 hex digits) of the labelling pass that wrote `folder`, as its class_means.json and cache
    manifest record it (both, joined by '+', should they differ); a UserError when one cannot be read."""
    from clipkd_dino.teacher.cache import CACHE_DIR, MANIFEST
    from clipkd_dino.teacher.class_means import SIDECAR_FILE

    records = [folder / SIDECAR_FILE] + [path for path in [folder / CACHE_DIR / MANIFEST] if path.is_file()]
    digests = []
    for path in records:
        try:
            digests.append(str(json.loads(path.read_text())["digest"])[:16])
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"cannot read the digest of the labelling pass in {path}: "
                            f"{getattr(error, 'strerror', None) or error}") from None
    return "+".join(dict.fromkeys(digests))


def _seen(folder: Path) -> str:
    try:
        return f"labelling pass {output_identity(folder)}"
    except UserError as error:
        return str(error)


def check_same_outputs(folders: dict[str, Path]) -> None:
    """Every rank reads the same labelling outputs (config key -> folder): a UserError on every rank naming the ranks
    that see another pass's output or none; one all-gather, nothing in a single process."""
    reports = gathered_objects((socket.gethostname(), {key: _seen(folder) for key, folder in folders.items()}))
    for key, folder in folders.items():
        reference = reports[0][1][key]
        differ = [f"rank {rank} ({host}) {seen[key]}" for rank, (host, seen) in enumerate(reports)
                  if seen[key] != reference]
        if differ:
            raise UserError(f"{key} {folder} is not the same on every rank: rank 0 ({reports[0][0]}) reads "
                            f"{reference}, {'; '.join(differ)}; put it on a file system every node shares "
                            "(distill.stage_dir then copies it to each node's disk)")


class Stage:
    """The node-local copy of one labelling output: `source`, its `identity`, the size of each file training reads,
    and where the copy goes (`root/NAME-IDENTITY`)."""

    def __init__(self, source: Path, root: Path) -> None:
        self.source, self.identity = source, output_identity(source)
        self.sizes = {name: (source / name).stat().st_size for name in read_files(source)}
        self.copy = root / f"{source.name}-{self.identity}"

    def complete(self, folder: Path | None = None) -> bool:
        """`folder` (default: the copy) holds this output: its record, the sizes and the digests agree."""
        folder = folder or self.copy
        try:
            record = json.loads((folder / RECORD).read_text())
            return (record.get("identity") == self.identity and record.get("files") == self.sizes
                    and all((folder / name).stat().st_size == size for name, size in self.sizes.items())
                    and output_identity(folder) == self.identity)
        except (OSError, ValueError, UserError):
            return False

    def temporaries(self) -> list[Path]:
        """Copies in progress (or abandoned) of this output in the stage folder."""
        return list(self.copy.parent.glob(f".{self.copy.name}.tmp-*"))

    def make(self, timeout: float) -> int:
        """Copy the output (local rank 0) unless a complete copy is there; returns the bytes copied."""
        if self.complete():
            return 0
        for abandoned in self.copy.parent.glob(f".{self.copy.name}.*"):  # crashed copies; not one still growing
            if time.time() - max((stat.st_mtime for stat in _stats(abandoned)), default=time.time()) > timeout:
                shutil.rmtree(abandoned, ignore_errors=True)
        temp = self.copy.parent / f".{self.copy.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        try:
            for name in self.sizes:
                (temp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.source / name, temp / name)
            write_json_atomic(temp / RECORD, {"source": str(self.source.resolve()), "identity": self.identity,
                                              "files": self.sizes})
            if not self.complete(temp):
                raise UserError(f"the copy of {self.source} in {temp} does not match it; did the labelling output "
                                "change while it was copied?")
            self._install(temp)
        except OSError as error:
            raise UserError(f"distill.stage_dir: cannot copy {self.source} to {self.copy}: "
                            f"{error.strerror or error}") from None
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        return sum(self.sizes.values())

    def _install(self, temp: Path) -> None:
        """Rename the checked copy `temp` into place; a stale copy there is moved aside first and deleted."""
        old = self.copy.parent / f".{self.copy.name}.old-{socket.gethostname()}-{os.getpid()}"
        if self.copy.exists() and not self.complete():
            self.copy.rename(old)
        try:
            temp.rename(self.copy)
        except OSError:
            if not self.complete():  # not another copier's complete copy that got there first
                raise
        shutil.rmtree(old, ignore_errors=True)

    def wait(self, timeout: float) -> None:
        """Wait (a rank other than its node's local rank 0) until the copy is complete; a UserError after
        `timeout` seconds in which no copy of it grew."""
        progress, since = None, time.monotonic()
        while not self.complete():
            now = sum(stat.st_size for temp in self.temporaries() for stat in _stats(temp))
            if now != progress:
                progress, since = now, time.monotonic()
            elif time.monotonic() - since > timeout:
                raise UserError(f"waited {timeout:g} s without progress for local rank 0's copy of {self.source} "
                                f"to {self.copy} (distill.stage_dir); train.shared_folder_timeout sets the wait")
            time.sleep(POLL_SECONDS)


def _stats(folder: Path) -> list[os.stat_result]:
    """The stat of `folder` and of everything in it, leaving out what vanishes meanwhile (a copy being renamed)."""
    stats = []
    for path in [folder, *folder.rglob("*")]:
        try:
            stats.append(path.stat())
        except OSError:
            pass
    return stats


def stage_outputs(folders: list[Path], setting: str | Path, timeout: float) -> dict[Path, Path]:
    """source -> its node-local copy under the folder `setting` names (`stage_root`), made by local rank 0 and
    waited for by the node's other ranks; a UserError on every rank naming the ranks where staging failed (one
    all-gather)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    staged, error = {}, None
    try:
        root = stage_root(str(setting))
        for source in folders:
            stage = Stage(source, root)
            if local_rank == 0:
                start = time.monotonic()
                copied = stage.make(timeout)
                what = (f"copied {copied / 1e6:.1f} MB in {time.monotonic() - start:.1f} s" if copied else
                        "reused its complete copy")
                print(f"distill.stage_dir: {socket.gethostname()} reads {source} from {stage.copy}: {what}",
                      file=sys.stderr, flush=True)
            else:
                stage.wait(timeout)
            staged[source] = stage.copy
    except (UserError, OSError) as failure:  # reported to every rank below, never left for them to wait on
        error = str(failure)
    failed = [(rank, host, message) for rank, (host, message)
              in enumerate(gathered_objects((socket.gethostname(), error))) if message]
    if failed:
        where = ", ".join(f"{host} (rank {rank})" for rank, host, _ in failed)
        raise UserError(f"distill.stage_dir {setting}: no node-local copy on {where}; rank {failed[0][0]}: "
                        f"{failed[0][2]}")
    return staged


def stage_root(setting: str) -> Path:
    """distill.stage_dir with this process's environment variables expanded; a UserError naming one that is not
    set (the folder would be a literal `$VAR` folder, perhaps on the shared file system)."""
    root = os.path.expandvars(setting)
    if "$" in root:
        raise UserError(f"distill.stage_dir {setting}: {root[root.index('$'):].split('/')[0]} is not set on "
                        f"{socket.gethostname()}; name a node-local folder")
    return Path(root)


def local_inputs(cfg: DistillConfig, labels_dir: str | None, timeout: float) -> DistillConfig:
    """`cfg` reading its cache and labels (`labels_dir`, the folder the dino-loss reads) from node-local copies
    when `distill.stage_dir` is set, once every rank is known to read the same ones; `cfg` itself otherwise."""
    keys = {"distill.cache": cfg.cache, "distill.labels": labels_dir}
    folders = {key: Path(folder) for key, folder in keys.items() if folder}
    check_same_outputs(folders)
    if not cfg.stage_dir:
        return cfg
    staged = stage_outputs(list(dict.fromkeys(folders.values())), cfg.stage_dir, timeout)
    return replace(cfg, cache=str(staged[folders["distill.cache"]]) if cfg.cache else None,
                   labels=str(staged[folders["distill.labels"]]) if labels_dir else None)
