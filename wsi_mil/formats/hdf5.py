"""HDF5 attribute handling shared by the patch, feature and score files.

CLAM and TRIDENT keep a file's attributes on the `coords` dataset; wsi-mil writes them on
both the file root and `coords`, and readers merge the two (root wins).
"""

from __future__ import annotations

import numpy as np


def set_attrs(obj, attrs: dict) -> None:
    """Write every non-None value of `attrs` onto an h5py File or Dataset."""
    for key, value in attrs.items():
        if value is not None:
            obj.attrs[key] = value


def plain(value):
    """An h5py attribute value as a plain Python value (bytes decoded, 1-element arrays unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def merged_attrs(f) -> dict:
    """Root attributes, completed by those on `coords`."""
    attrs = {k: plain(v) for k, v in f.attrs.items()}
    if "coords" in f:
        attrs.update({k: plain(v) for k, v in f["coords"].attrs.items() if k not in attrs})
    return attrs
