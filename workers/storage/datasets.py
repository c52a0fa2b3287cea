"""Datasets in storage: ``datasets/<name>/files/<relative path>`` and ``datasets/<name>/manifest.json`` (each file's
size and sha256), the manifest written last. A dataset without a manifest is incomplete: it is never listed or
resolved, and the next push of that name clears it. The manifest also names the dataset's ``owner`` (who pushed it;
only they or an admin replace, share or remove it; None for one pushed before owners were recorded: admins only)
and whether it is ``shared`` (readable by every user's jobs; services.access). A dataset pushed by the CLI also
records what its reader found: ``examples``, ``image_shape`` [C, H, W] (null: images of mixed sizes), ``classes``
(the number of label classes; null: no labels) and ``factors`` ([{name, size}]; null: none); older manifests lack
these fields."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

from pyarrow.fs import FileType

from workers.errors import AeforgeError
from workers.storage.objects import ObjectNotFound, ObjectStore, StorageError, clean_relpath, sha256_file

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DATASETS, MANIFEST, MANIFEST_VERSION = "datasets", "manifest.json", 1
# What a push's ``describe`` may record: what the data's reader found (workers.data.summary.DataSummary).
CONTENT_FIELDS = ("examples", "image_shape", "classes", "factors")


def validate_dataset_name(name: str) -> str:
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        raise StorageError(
            f"invalid dataset name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting "
            f"with a letter or digit"
        )
    return name


def human_size(num_bytes: int) -> str:
    size, units = float(num_bytes), ["B", "KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{int(size)} B" if units[0] == "B" else f"{size:.1f} {units[0]}"


def data_formats() -> tuple[str, ...]:
    from workers.config import DataConfig

    return tuple(value for arg in get_args(DataConfig.model_fields["format"].annotation) for value in get_args(arg))


class DatasetStore(ObjectStore):
    def _dataset_prefix(self, name: str) -> str:
        return f"{DATASETS}/{validate_dataset_name(name)}"

    def _no_dataset(self, name: str) -> StorageError:
        return StorageError(f"no dataset named '{name}' in {self.uri(DATASETS)} (`aeforge data ls` lists them)")

    def _read_manifest(self, name: str) -> tuple[dict[str, Any], bytes] | None:
        """(manifest, its bytes) of a complete dataset, or None if there is no manifest."""
        relpath = f"{self._dataset_prefix(name)}/{MANIFEST}"
        try:
            raw = self.get_bytes(relpath)
        except ObjectNotFound:
            return None
        try:
            manifest = json.loads(raw)
            if not isinstance(manifest["files"], list) or not manifest["files"]:
                raise ValueError("no files")
            for f in manifest["files"]:
                f["path"] = clean_relpath(f["path"], "file path")
                if (
                    not isinstance(f["size"], int)
                    or f["size"] < 0
                    or not re.fullmatch(r"[0-9a-f]{64}", str(f["sha256"]))
                ):
                    raise ValueError(f"bad size or sha256 for {f['path']}")
            if manifest.get("layout") not in ("files", "folder"):
                raise ValueError(f"unknown layout {manifest.get('layout')!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"the manifest of dataset '{name}' ({self.uri(relpath)}) is invalid: {exc}") from None
        return manifest, raw

    def manifest(self, name: str) -> dict[str, Any]:
        found = self._read_manifest(name)
        if found is None:
            raise self._no_dataset(name)
        return found[0]

    @staticmethod
    def _check_owner(name: str, manifest: dict[str, Any], owner: str | None, admin: bool, what: str) -> None:
        if not admin and manifest.get("owner") != owner:
            held = manifest.get("owner") or "no one (pushed before owners were recorded)"
            raise StorageError(f"dataset '{name}' belongs to {held}: only its owner or an admin may {what} it")

    def push(
        self,
        paths: list[Path | str],
        name: str,
        *,
        overwrite: bool = False,
        format: str | None = None,
        progress: Callable[[str], None] | None = None,
        owner: str | None = None,
        admin: bool = False,
        describe: Callable[[list[Path], str], Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Upload files (or one folder's files, by relative path) as dataset ``name`` owned by ``owner``; returns the
        manifest, written last (an interrupted push leaves an incomplete dataset). ``format``: one of
        :func:`data_formats`, inferred if None. Replacing another owner's dataset takes ``admin``; it keeps its owner
        and sharing. ``describe(paths, format)`` (the CLI passes ``workers.data.summary``'s reader check) runs before
        anything is uploaded or cleared; its fields (examples, image_shape, classes, factors) go into the manifest,
        and an AeforgeError it raises refuses the push, leaving a dataset of that name as it was."""
        validate_dataset_name(name)
        local_paths = [Path(p) for p in paths]
        if not local_paths:
            raise StorageError("no files to push")
        for p in local_paths:
            if not p.exists():
                raise StorageError(f"no such file or folder: {p}")
        layout = "folder" if any(p.is_dir() for p in local_paths) else "files"
        if layout == "folder" and len(local_paths) != 1:
            raise StorageError(
                f"push either one folder or one or more files, not a mix: {', '.join(map(str, local_paths))}"
            )
        for i, p in enumerate(local_paths if layout == "files" else []):
            if not p.is_file():
                raise StorageError(f"not a regular file: {p}")
            if p.name in (q.name for q in local_paths[:i]):
                raise StorageError(f"two files named '{p.name}': a dataset keeps files by name")
        entries = (
            [(f, f.relative_to(local_paths[0]).as_posix()) for f in sorted(local_paths[0].rglob("*")) if f.is_file()]
            if layout == "folder"
            else [(p, p.name) for p in local_paths]
        )
        if not entries:
            raise StorageError(f"folder {local_paths[0]} has no files")
        if format is None:
            from workers.data.formats import (
                infer_format,
            )  # imported here: workers.data imports torch, `data ls` does not

            try:
                format = str(infer_format(local_paths[0]))
            except ValueError as exc:  # a DataError
                raise StorageError(
                    f"cannot tell the format of {local_paths[0]} ({exc}); give it with --format"
                ) from None
        elif format not in data_formats():
            raise StorageError(f"unknown format {format!r}: use one of {', '.join(data_formats())}")
        existing = self._read_manifest(name)
        if existing is not None and not overwrite:
            raise StorageError(
                f"dataset '{name}' already exists (pushed {existing[0].get('created', '?')}); "
                f"use --overwrite to replace it"
            )
        if existing is not None:
            self._check_owner(name, existing[0], owner, admin, "replace")
        contents = {}
        if describe is not None:
            try:
                found = describe(local_paths, format)
            except AeforgeError as exc:  # a DataError naming the file and what is wrong with it
                raise StorageError(f"cannot push dataset '{name}': {exc}") from None
            contents = {key: found[key] for key in CONTENT_FIELDS if key in found}
        owner = (existing[0].get("owner") if existing else None) or owner  # a replaced dataset keeps its owner
        shared = existing is not None and existing[0].get("shared") is True  # and its sharing
        files: list[dict[str, Any]] = []
        prefix = self._clear(name)  # from here on the name reads as incomplete until the manifest lands
        for local, relpath in entries:
            if progress is not None:
                progress(relpath)
            files.append({"path": relpath, "size": local.stat().st_size, "sha256": sha256_file(local)})
            self.put_file(local, f"{prefix}/files/{relpath}")
        manifest = {
            "aeforge_manifest": MANIFEST_VERSION,
            "name": name,
            "layout": layout,
            "format": format,
            "files": files,
            "size": sum(f["size"] for f in files),
            "owner": owner,
            "shared": shared,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **contents,
        }
        self.put_bytes(json.dumps(manifest, indent=2).encode(), f"{prefix}/{MANIFEST}")
        return manifest

    def _clear(self, name: str) -> str:
        """Delete a dataset, its manifest first (so a half-deleted dataset is never used); returns its prefix."""
        prefix = self._dataset_prefix(name)
        with contextlib.suppress(ObjectNotFound):
            self.delete(f"{prefix}/{MANIFEST}")
        self.delete_prefix(prefix)
        return prefix

    def ls(self) -> list[dict[str, Any]]:
        """Manifests of the complete datasets, by name."""
        names = sorted(i.base_name for i in self._infos(DATASETS, recursive=False) if i.type == FileType.Directory)
        found = [self._read_manifest(n) for n in names if DATASET_NAME.fullmatch(n)]
        return [f[0] for f in found if f is not None]

    def share(self, name: str, shared: bool = True, *, owner: str | None = None, admin: bool = False) -> dict[str, Any]:
        """Mark dataset ``name`` shared (or not): only its owner or an admin may. Returns the new manifest."""
        manifest = self.manifest(name)
        self._check_owner(name, manifest, owner, admin, "share or unshare")
        manifest["shared"] = bool(shared)
        self.put_bytes(json.dumps(manifest, indent=2).encode(), f"{self._dataset_prefix(name)}/{MANIFEST}")
        return manifest

    def rm(self, name: str, *, owner: str | None = None, admin: bool = False) -> int:
        """Delete a dataset (its owner or an admin); returns the files deleted. An incomplete dataset (no manifest)
        is cleared too."""
        present = self.list_prefix(self._dataset_prefix(name))
        if not present:
            raise self._no_dataset(name)
        found = self._read_manifest(name)
        if found is not None:
            self._check_owner(name, found[0], owner, admin, "remove")
        self._clear(name)
        return len(present)
