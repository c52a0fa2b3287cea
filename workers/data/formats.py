"""Which reader a local path needs, told from its name (a module of its own: storage guesses a pushed dataset's
format with it, and the readers check every open with storage, so this must not import the readers)."""

from __future__ import annotations

from pathlib import Path

from workers.data.base import DataError


def infer_format(path: str | Path) -> str:
    """ "folder" for a directory, "npz" for ``*.npz``, "hdf5" for ``*.h5``/``*.hdf5`` (3D Shapes), "idx" for a name
    containing "idx" or "ubyte" (``.gz`` or not); anything else is a DataError. Within "npz", dSprites and MPI3D
    archives are told by their keys (see ``workers.data.npz``)."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    name = path.name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".h5", ".hdf5")):
        return "hdf5"
    if "idx" in name or "ubyte" in name:
        return "idx"
    raise DataError(
        f"{path}: cannot tell the data format from the name; accepted: a folder of PNG/JPEG images, a .npz "
        f"archive, an HDF5 file of 3D Shapes (.h5, .hdf5), or an IDX file (name containing 'idx' or 'ubyte', "
        f"optionally .gz); or set data.format"
    )
