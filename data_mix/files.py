"""Source files wherever they are kept: local paths and fsspec URLs (`s3://`, `gs://`, `hf://datasets/…`).

A corpus's `paths` are expanded here (globs, folders) into `SourceFile`s that carry what the
build needs to know about a file without reading it: its size, and a version that changes when
its content does (a checksum for a local file, the ETag of an object, else size and
modification time). Credentials come from where each filesystem's own library looks
(environment, profile, instance role); they are never part of a URL dapt writes anywhere.
Compressed files (`.gz`, `.bz2`, `.zst`, `.xz`) are decompressed while read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dapt.base import DaptError
from dapt.data_mix.config import is_url

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "xz"}


@dataclass(frozen=True)
class SourceFile:
    """One file of a corpus: its name as the user gave it (a local path or a URL) and its size."""

    url: str
    size: int

    @property
    def remote(self) -> bool:
        return is_url(self.url)

    @property
    def suffixes(self) -> list[str]:
        return [s.lower() for s in Path(self.url.rsplit("/", 1)[-1]).suffixes]

    @property
    def compression(self) -> str | None:
        suffixes = self.suffixes
        return COMPRESSIONS.get(suffixes[-1]) if suffixes else None

    def __str__(self) -> str:
        return self.url


def _filesystem(url: str, corpus: str):
    """The fsspec filesystem of `url`; a scheme without its driver installed names the package."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise DaptError(f"corpus '{corpus}': cannot read {url}: {err}") from None
    except ValueError as err:  # an unknown protocol
        raise DaptError(f"corpus '{corpus}': cannot read {url}: {err}; give a local path or a URL fsspec knows "
                        "(s3://, gs://, hf://datasets/…)") from None


def storage_error(err: Exception, url: str, corpus: str) -> DaptError:
    """A failure of object storage as one line naming the URL and what to check."""
    name = type(err).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in str(err).lower():
        hint = ("no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                "(GOOGLE_APPLICATION_CREDENTIALS for gs://, HF_TOKEN for hf://)")
    elif isinstance(err, PermissionError):
        hint = "access denied: check that these credentials may list and read it"
    elif isinstance(err, FileNotFoundError):
        hint = "no such bucket or object: check the URL"
    else:
        hint = "unreachable: check the URL, the endpoint (AWS_ENDPOINT_URL) and the network"
    detail = str(err).splitlines()[0] if str(err) else name
    return DaptError(f"corpus '{corpus}': cannot read {url} ({name}: {detail}); {hint}")


def resolve_files(paths: list[str], corpus: str) -> list[SourceFile]:
    """Expand globs and folders in order; a pattern that matches nothing is an error naming it."""
    files: list[SourceFile] = []
    for pattern in paths:
        found = _local_matches(pattern) if not is_url(pattern) else _remote_matches(pattern, corpus)
        if not found:
            raise DaptError(f"corpus '{corpus}': no file matches {pattern}; check `paths` in the experiment file")
        files.extend(found)
    return files


def _local_matches(pattern: str) -> list[SourceFile]:
    import glob

    found = []
    for match in map(Path, sorted(glob.glob(pattern, recursive=True))):
        for path in sorted(p for p in match.rglob("*") if p.is_file()) if match.is_dir() else [match]:
            found.append(SourceFile(str(path), path.stat().st_size))
    return found


def _remote_matches(pattern: str, corpus: str) -> list[SourceFile]:
    fs, path = _filesystem(pattern, corpus)
    fs.invalidate_cache()  # listings are cached per process; a store's staleness needs them as they are now
    try:
        matches = fs.glob(path, detail=True) if any(c in path for c in "*?[") else (
            {path: fs.info(path)} if fs.exists(path) else {})
        found = []
        for name, info in sorted(matches.items()):
            entries = sorted(fs.find(name, detail=True).items()) if info.get("type") == "directory" else [(name, info)]
            found.extend(SourceFile(fs.unstrip_protocol(entry), int(meta.get("size") or 0)) for entry, meta in entries)
        bucket = path.split("/", 1)[0]
        if not found and not fs.exists(bucket):
            raise DaptError(f"corpus '{corpus}': cannot read {pattern}: its bucket {bucket} does not exist or these "
                            "credentials cannot see it; check the URL")
        return found
    except DaptError:
        raise
    except Exception as err:  # each storage library raises its own kinds
        raise storage_error(err, pattern, corpus) from None


def file_checksum(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()[:32]


def file_stat(source: SourceFile, corpus: str) -> list:
    """What changes when a file does, cheap to get: size and modification time (local), ETag (objects)."""
    if not source.remote:
        stat = os.stat(source.url)
        return [stat.st_size, stat.st_mtime_ns]
    fs, path = _filesystem(source.url, corpus)
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except Exception as err:
        raise storage_error(err, source.url, corpus) from None
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("blob_id")
    return [int(info.get("size") or 0), str(tag) if tag else str(info.get("LastModified") or info.get("mtime"))]


def file_version(source: SourceFile, corpus: str) -> str:
    """What a store records of a source: a content checksum of a local file; an object's ETag
    (or size and modification time) for a remote one, which would otherwise have to be downloaded."""
    return file_checksum(source.url) if not source.remote else "stat:" + ":".join(map(str, file_stat(source, corpus)))


def open_source(source: SourceFile, corpus: str, decompress: bool = True) -> IO[bytes]:
    """A binary handle on the file, decompressed by its suffix unless `decompress` is false (byte ranges)."""
    if not source.remote:
        if decompress and source.compression:
            import fsspec

            return fsspec.open(source.url, "rb", compression=source.compression).open()
        return open(source.url, "rb")
    fs, path = _filesystem(source.url, corpus)
    try:
        return fs.open(path, "rb", compression=source.compression if decompress else None)
    except Exception as err:
        raise storage_error(err, source.url, corpus) from None
