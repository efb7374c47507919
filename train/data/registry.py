"""Build a data source by name.

    build_source(name, root, split, fold=None, mode="train", **kwargs) -> FewShotSource

Names: coco20i, pascal5i, lvis92i, fss1000, ade20k, camvid, folder, incontext, synthetic
(generated scenes; no root needed, see ``ROOTLESS_SOURCES``).
``kwargs`` go to the source's constructor (e.g. ``index_cache=False``, ``crowd="ignore"``).
For "incontext", ``root`` is a dict ``{"coco": .., "ade20k": .., "voc": ..}`` or a folder
with ``coco/``, ``ade20k/`` and ``voc/`` sub-folders (see ``train.data.incontext``).
"""

from __future__ import annotations

from .ade20k import Ade20k
from .base import FewShotSource
from .camvid import CamVid
from .coco20i import Coco20i
from .folder import FolderSource
from .fss1000 import Fss1000
from .incontext import InContextSource
from .lvis92i import Lvis92i
from .pascal5i import Pascal5i
from .synthetic import SyntheticSource

SOURCES: dict[str, type[FewShotSource]] = {
    "coco20i": Coco20i,
    "pascal5i": Pascal5i,
    "lvis92i": Lvis92i,
    "fss1000": Fss1000,
    "ade20k": Ade20k,
    "camvid": CamVid,
    "folder": FolderSource,
    "incontext": InContextSource,
    "synthetic": SyntheticSource,
}

ROOTLESS_SOURCES = frozenset({"synthetic"})
"""Sources that draw their data and need no ``root`` (None is fine)."""


def build_source(name: str, root, split: str, fold: int | None = None, mode: str = "train",
                 **kwargs) -> FewShotSource:
    """Construct the source ``name`` as ``SOURCES[name](root, split, fold, mode, **kwargs)``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), or any
            invalid argument / missing folder reported by the source.
    """
    cls = SOURCES.get(name)
    if cls is None:
        raise ValueError(f"unknown source name {name!r}; valid names: {', '.join(SOURCES)}")
    return cls(root, split, fold, mode, **kwargs)
