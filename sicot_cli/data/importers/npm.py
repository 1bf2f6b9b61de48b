"""npm tarballs: fetched with the machine's ``npm pack``, verified against pinned checksums, and
unpacked member by member from an allow-list (nothing outside the target folder can be written).

``npm pack NAME@VERSION`` needs no account and no network beyond the registry. The pinned
``integrity`` is npm's own (``sha512-`` + base64 of the tarball's SHA-512, as ``npm pack --json``
and the registry report it); the SHA-256 is a second, independent pin.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from sicot_cli.data.importers.common import parse_json
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import ensure_dir, open_regular, read_text

log = logging.getLogger(__name__)

MARKER = ".sicot-unpacked.json"  # written last: an unpacked folder without it is incomplete


@dataclass(frozen=True)
class NpmPackage:
    """One pinned npm package and the members of it that are unpacked."""

    name: str
    version: str
    integrity: str  # "sha512-<base64>"
    sha256: str  # hex
    members: tuple[str, ...]  # regular expressions over package-relative paths (full match)

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def folder(self) -> str:
        """The package's name as one folder name: ``@scope/name`` -> ``scope-name`` (as npm names the tarball)."""
        return self.name.removeprefix("@").replace("/", "-")

    @property
    def tarball(self) -> str:
        """The file name ``npm pack`` gives the package (``@scope/name`` -> ``scope-name-<version>.tgz``)."""
        return f"{self.folder}-{self.version}.tgz"

    def wants(self, relpath: str) -> bool:
        return any(re.fullmatch(p, relpath) for p in self.members)


def checksums(path: Path) -> tuple[str, str]:
    """The file's npm integrity string (``sha512-<base64>``) and SHA-256 hex digest, in one pass."""
    h512, h256 = hashlib.sha512(), hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(1 << 20):
            h512.update(chunk)
            h256.update(chunk)
    return "sha512-" + base64.b64encode(h512.digest()).decode(), h256.hexdigest()


def verify(path: Path, pkg: NpmPackage) -> None:
    """Raise unless ``path`` has the pinned checksums of ``pkg``."""
    integrity, sha256 = checksums(path)
    if integrity != pkg.integrity or sha256 != pkg.sha256:
        raise SicotError(
            f"{path}: checksum mismatch for {pkg.spec} (sha256 {sha256}, expected {pkg.sha256}): "
            "delete the file and fetch it again"
        )


def npm_commands(packages: tuple[NpmPackage, ...]) -> str:
    return " and ".join(f"`npm pack {p.spec}`" for p in packages)


def fetch_tarball(pkg: NpmPackage, folder: Path, npm: str | None) -> Path:
    """Return ``folder/<tarball>`` with verified checksums, running ``npm pack`` when it is absent.

    The download goes to a temporary folder and is renamed only once verified, so an interrupted
    or tampered download never carries the final name.

    Raises:
        SicotError: npm missing (the message gives the command to run instead), npm failing,
            checksum mismatch.
    """
    target = folder / pkg.tarball
    if target.is_file():
        verify(target, pkg)
        return target
    if target.exists() or target.is_symlink():  # a folder, a dangling link...: npm pack would run for nothing
        raise SicotError(f"{target}: exists and is not a file (the package's tarball goes there): move it away")
    if npm is None:
        raise SicotError(
            f"npm is not installed: in {folder} run {npm_commands((pkg,))} (or put the tarball there), "
            "then run this command again"
        )
    ensure_dir(folder)
    tmp = folder / f".npm-pack-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        log.info("npm pack %s", pkg.spec)
        try:
            done = subprocess.run(  # --loglevel=error: no progress, but npm's reason when it fails
                [npm, "pack", pkg.spec, "--loglevel=error"], cwd=tmp, capture_output=True, text=True, timeout=1800,
                check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SicotError(f"npm pack {pkg.spec} failed ({e})") from None
        got = tmp / pkg.tarball
        if done.returncode != 0 or not got.is_file():
            raise SicotError(
                f"npm pack {pkg.spec} failed (exit {done.returncode}): {npm_reason(done.stderr)}; on a machine that "
                f"reaches the npm registry, run `npm pack {pkg.spec}` and put {pkg.tarball} in {folder}, then run "
                "this command again"
            )
        verify(got, pkg)
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_marker(marker: Path, pkg: NpmPackage) -> int | None:
    """The file count recorded by a complete unpack of ``pkg``, or None when the marker is absent or not ours.

    The marker is only trusted in its exact form: a JSON object naming ``pkg`` and its pinned
    integrity, with a plain file count. Anything else (a forged marker listing paths, a JSON bomb,
    a FIFO) means "not unpacked", and the verified tarball is unpacked again.
    """
    try:
        info = parse_json(read_text(marker))
    except (SicotError, ValueError):
        return None
    if not isinstance(info, dict) or set(info) != {"package", "integrity", "files"}:
        return None
    files = info["files"]
    if (
        info["package"] != pkg.spec
        or info["integrity"] != pkg.integrity
        or not isinstance(files, int)
        or isinstance(files, bool)
        or files < 1
    ):
        return None
    return files


def _member_path(name: str) -> str | None:
    """The package-relative path of a tar member (``package/x/y`` -> ``x/y``), or None if unsafe."""
    parts = name.split("/")
    if len(parts) < 2 or parts[0] != "package" or any(p in ("", ".", "..") for p in parts[1:]) or name.startswith("/"):
        return None
    return "/".join(parts[1:])


def unpack(tarball: Path, pkg: NpmPackage, dest: Path) -> int:
    """Unpack the allowed members of ``tarball`` into ``dest`` (a folder named after the package).

    Only regular files whose package-relative path matches ``pkg.members`` are written, each to
    ``dest/<that path>``; links, devices and paths with ``..`` are never written. The folder is
    built under a temporary name and renamed when complete, with a marker recording the integrity.
    An already complete ``dest`` is kept as it is.

    Returns:
        The number of files in ``dest``.

    Raises:
        SicotError: a wanted member that is not a regular file, or a corrupt archive.
    """
    done = _complete(dest, pkg)
    if done is not None:
        return done
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    files = 0
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                rel = _member_path(member.name)
                if rel is None or not pkg.wants(rel):
                    continue
                if not member.isfile():
                    raise SicotError(f"{tarball}: member {member.name!r} is not a regular file; refusing to unpack it")
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    raise SicotError(f"{tarball}: cannot read member {member.name!r}")
                with src, out.open("wb") as f:
                    shutil.copyfileobj(src, f)
                files += 1
        if files == 0:
            raise SicotError(f"{tarball}: none of the expected files ({', '.join(pkg.members)}) is in the archive")
        (tmp / MARKER).write_text(
            json.dumps({"package": pkg.spec, "integrity": pkg.integrity, "files": files}) + "\n", encoding="utf-8"
        )
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise SicotError(f"{tarball}: cannot unpack ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def unpacked(dest: Path, pkg: NpmPackage) -> bool:
    """Whether ``dest`` is a complete unpacking of ``pkg`` (its marker records the pinned integrity,
    and the files it counts are there)."""
    return _complete(dest, pkg) is not None


def _complete(dest: Path, pkg: NpmPackage) -> int | None:
    """The marker's file count when ``dest`` still holds that many files; None otherwise (no marker, or
    files deleted since: the package is then unpacked again from its verified tarball, and the
    manifests come out whole, not short of the missing images)."""
    done = read_marker(dest / MARKER, pkg)
    if done is None:
        return None
    here = sum(1 for p in dest.rglob("*") if p.is_file() and not p.is_symlink()) - 1  # but the marker
    if here != done:
        log.warning(
            "%s: %d of the %d unpacked files are there (removed or added since): unpacking %s again", dest, here,
            done, pkg.tarball,
        )  # fmt: skip
        return None
    return done


def npm_reason(stderr: str) -> str:
    """npm's own reason for a failure, in one line: its error code and first message (the network,
    the cache's permissions, an unknown package), without the stack trace and the log file's name."""
    lines = []
    for raw in stderr.splitlines():
        line = re.sub(r"^npm (error|ERR!)\s?", "", raw.strip()).strip()
        if line and not line.startswith(("at ", "A complete log", "{", "}")) and not re.match(r"^\w+: ['\d]", line):
            lines.append(line)
    code = next((ln.split(None, 1)[1] for ln in lines if ln.startswith("code ") and " " in ln), None)
    message = next((ln for ln in lines if not ln.startswith(("code ", "syscall ", "errno "))), None)
    said = "; ".join(x for x in (code, message) if x) or "no output"
    return said if len(said) <= 300 else said[:297] + "..."


def fetch_packages(folder: Path, packages: tuple[NpmPackage, ...], npm: str | None = "auto") -> dict[str, Path]:
    """Fetch (``npm pack``), verify and unpack ``packages``, each into ``folder/<pkg.folder>``.

    Packages already unpacked with the pinned integrity, and tarballs already present (verified),
    are not fetched again.

    Args:
        folder: the download folder.
        packages: the pinned packages.
        npm: the npm executable; ``"auto"`` looks it up on PATH; None means not available.

    Returns:
        Package name -> its unpacked folder.

    Raises:
        SicotError: npm missing while a tarball is missing (the message gives the commands to run),
            npm failing, checksum mismatch, unsafe archive.
    """
    if npm == "auto":
        npm = shutil.which("npm")
    ensure_dir(folder)
    _remove_stale_temporaries(folder, packages)
    todo = [p for p in packages if not unpacked(folder / p.folder, p)]
    missing = [p for p in todo if not (folder / p.tarball).is_file()]
    if missing and npm is None:
        raise SicotError(
            f"npm is not installed: in {folder} run {npm_commands(tuple(missing))}, then run this command again"
        )
    for pkg in todo:
        unpack(fetch_tarball(pkg, folder, npm), pkg, folder / pkg.folder)
    return {p.name: folder / p.folder for p in packages}


def _remove_stale_temporaries(folder: Path, packages: tuple[NpmPackage, ...]) -> None:
    """The download and unpack folders of fetches killed before they could remove them (named by
    their pid; the caller holds ``folder``, so no live fetch owns one)."""
    names = [".npm-pack-", *(f".{p.folder}.tmp-" for p in packages)]
    for tmp in folder.iterdir():
        rest = next((tmp.name[len(n) :] for n in names if tmp.name.startswith(n)), None)
        if rest is not None and rest.isascii() and rest.isdigit() and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
