"""Writers of tiny on-disk datasets in each benchmark's real format (for the data tests), and where the real CamVid is.

Importing this module also puts the repository root on ``sys.path`` so that
``import train`` works however pytest is started.

The tests on real data read CamVid from the folder named by the environment variable
``DIFFEWS_CAMVID_ROOT`` (layout: ``train.data.camvid``), by default ``shared/data/camvid``
beside the repository (``<repository>/../shared/data/camvid``). Without it they skip, and
the reason names the variable and the folder looked at (``pytestmark = needs_camvid``).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CAMVID_ENV = "DIFFEWS_CAMVID_ROOT"
CAMVID_DEFAULT = ROOT.parent / "shared" / "data" / "camvid"
CAMVID = Path(os.environ.get(CAMVID_ENV) or CAMVID_DEFAULT).expanduser()
"""The real CamVid folder: ``$DIFFEWS_CAMVID_ROOT``, else ``shared/data/camvid`` beside the repository."""

needs_camvid = pytest.mark.skipif(
    not CAMVID.is_dir(),
    reason=f"CamVid not found at {CAMVID}: set {CAMVID_ENV} to the CamVid folder "
           f"(default: shared/data/camvid beside the repository)",
)
"""Mark of the tests on real CamVid: ``pytestmark = needs_camvid``."""


def write_jpeg(path: Path, width: int, height: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def write_png(path: Path, arr: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Save a uint8 (H, W) label array as a grey PNG, or as a palette PNG of those indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if palette is None:
        Image.fromarray(arr).save(path)
    else:
        im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
        im.putpalette(palette.reshape(-1).tolist())
        im.save(path)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major runs, starting with zeros) of a bool mask."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rect_polygon(x0, y0, x1, y1) -> list[float]:
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


def box(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------------- COCO 2014 (JSON)

COCO_CAT_IDS = [1, 2, 3, 5, 7, 9, 11, 13]  # non-contiguous, like COCO's
COCO_H, COCO_W = 20, 24


def coco_plan(split: str) -> dict[int, list[int]]:
    """``{image index: [contiguous class ids]}`` of the COCO fixture."""
    n = 12 if split == "train" else 8
    plan = {i: sorted({i % 7, (i + 3) % 7}) for i in range(n)}
    plan[0] = plan[0] + [7]  # class 7 (cat id 13) in one image only
    return plan


def make_coco(root: Path, splits=("train", "val")) -> Path:
    """COCO 2014 layout with polygon, uncompressed RLE and crowd (compressed RLE) annotations.

    Class ``c`` of an image: a polygon box in rows 2..8 if c is its first class, an
    uncompressed-RLE box in rows 10..16 otherwise; image 1 of every split also has a crowd
    region of its first class (compressed RLE, rows 17..19, cols 0..5).
    """
    for split in splits:
        tag = f"{split}2014"
        images, anns = [], []
        for i, classes in coco_plan(split).items():
            name = f"COCO_{tag}_{i:012d}.jpg"
            write_jpeg(root / tag / name, COCO_W, COCO_H, seed=i)
            images.append({"id": 1000 + i, "file_name": name, "height": COCO_H, "width": COCO_W})
            for j, c in enumerate(classes):
                x0 = 2 + 6 * (c % 3)
                if j == 0:
                    segm = [rect_polygon(x0, 2, x0 + 4, 8)]
                else:
                    segm = uncompressed_rle(box(COCO_H, COCO_W, 10, 16, x0, x0 + 4))
                anns.append({"id": len(anns) + 1, "image_id": 1000 + i, "category_id": COCO_CAT_IDS[c],
                             "segmentation": segm, "iscrowd": 0, "area": 24.0, "bbox": [x0, 2, 4, 6]})
            if i == 1:
                anns.append({"id": len(anns) + 1, "image_id": 1000 + i, "category_id": COCO_CAT_IDS[classes[0]],
                             "segmentation": compressed_rle(box(COCO_H, COCO_W, 17, 20, 0, 6)),
                             "iscrowd": 1, "area": 18.0, "bbox": [0, 17, 6, 3]})
        cats = [{"id": cid, "name": f"cat{cid}", "supercategory": "x"} for cid in COCO_CAT_IDS]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        with open(root / "annotations" / f"instances_{tag}.json", "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": cats[::-1]}, f)
    return root


def make_coco_png(root: Path, with_pickles: bool = True) -> Path:
    """HSNet's COCO layout: PNG masks with class id + 1, optional fold pickles."""
    classwise = {}
    for i in range(10):
        tag = "val2014"
        name = f"COCO_{tag}_{i:012d}"
        write_jpeg(root / tag / f"{name}.jpg", 16, 12, seed=i)
        lab = np.zeros((12, 16), dtype=np.uint8)
        classes = [i % 8, 40 + i % 3]
        lab[0:6, :] = classes[0] + 1
        lab[6:12, 0:8] = classes[1] + 1
        write_png(root / "annotations" / tag / f"{name}.png", lab)
        for c in classes:
            classwise.setdefault(c, []).append(f"{tag}/{name}.jpg")
    if with_pickles:
        for f in range(4):
            d = root / "splits" / "coco" / "val"
            d.mkdir(parents=True, exist_ok=True)
            data = {c: v for c, v in classwise.items() if c % 4 == f}
            with open(d / f"fold{f}.pkl", "wb") as fh:
                pickle.dump(data, fh)
    return root


# ---------------------------------------------------------------------- PASCAL VOC 2012

VOC_SIZE = 24


def voc_plan(split: str) -> dict[str, list[int]]:
    """``{image name: [contiguous class ids]}``: three classes per image."""
    n, first = (30, 2008) if split == "train" else (20, 2009)
    return {f"{first}_{i:06d}": sorted({i % 20, (i + 7) % 20, (i + 13) % 20}) for i in range(n)}


def make_voc(root: Path, hsnet_splits: bool = False, aug: bool = False) -> Path:
    """VOC2012: JPEGImages, palette SegmentationClass PNGs with 255 borders, ImageSets.

    An image's k-th class fills rows 8k..8k+7 with a 1-pixel 255 border around it.
    """
    from train.data.pascal5i import voc_colormap

    pal = voc_colormap()
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        plan = voc_plan(split)
        for i, (name, classes) in enumerate(plan.items()):
            write_jpeg(root / "JPEGImages" / f"{name}.jpg", VOC_SIZE, VOC_SIZE, seed=i)
            lab = np.zeros((VOC_SIZE, VOC_SIZE), dtype=np.uint8)
            for k, c in enumerate(classes):
                lab[8 * k:8 * k + 8, 4:20] = 255
                lab[8 * k + 1:8 * k + 7, 5:19] = c + 1
            folder = "SegmentationClassAug" if aug else "SegmentationClass"
            write_png(root / folder / f"{name}.png", lab, palette=None if aug else pal)
        (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in plan))
        if hsnet_splits:
            d = root / "splits" / "pascal" / ("trn" if split == "train" else "val")
            d.mkdir(parents=True, exist_ok=True)
            for f in range(4):
                lines = [f"{n}__{c + 1}" for n, cs in plan.items() for c in cs if c // 5 == f]
                (d / f"fold{f}.txt").write_text("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------------- LVIS v1

LVIS_NUM_CATS = 23
LVIS_H, LVIS_W = 16, 20


def lvis_val_plan() -> dict[int, list[int]]:
    """``{category index: [val image indices]}``; cats 5 and 17 have one image, 22 none."""
    plan = {}
    for k in range(LVIS_NUM_CATS):
        if k == 22:
            plan[k] = []
        elif k in (5, 17):
            plan[k] = [k % 12]
        else:
            plan[k] = sorted({k % 12, (k + 1) % 12})
    return plan


def make_lvis(root: Path) -> Path:
    """LVIS v1 jsons (polygons, coco_url) with images in train2017/ and val2017/."""
    cats = [{"id": 100 + 3 * k, "name": f"lvis{k}", "synset": "x", "frequency": "r"} for k in range(LVIS_NUM_CATS)]

    def build(split, plan, n_images):
        images, anns = [], []
        for i in range(n_images):
            folder = "val2017" if i % 2 == 0 else "train2017"
            fname = f"{(0 if split == 'val' else 500000) + i:012d}.jpg"
            write_jpeg(root / folder / fname, LVIS_W, LVIS_H, seed=i)
            images.append({"id": i + 1 + (0 if split == "val" else 10000), "height": LVIS_H, "width": LVIS_W,
                           "coco_url": f"http://images.cocodataset.org/{folder}/{fname}",
                           "not_exhaustive_category_ids": [], "neg_category_ids": []})
        for k, imgs in plan.items():
            for i in imgs:
                x0 = 1 + (k % 4) * 4
                anns.append({"id": len(anns) + 1, "image_id": images[i]["id"], "category_id": cats[k]["id"],
                             "segmentation": [rect_polygon(x0, 2, x0 + 3, 12)], "area": 30.0,
                             "bbox": [x0, 2, 3, 10]})
        with open(root / f"lvis_v1_{split}.json", "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": cats}, f)

    root.mkdir(parents=True, exist_ok=True)
    build("val", lvis_val_plan(), 12)
    build("train", {k: [k % 6, (k + 2) % 6] for k in range(LVIS_NUM_CATS)}, 6)
    return root


# ---------------------------------------------------------------------- FSS-1000

FSS_SPLITS = {"trn": ["zebra", "abacus", "bee"], "val": ["cup", "apple"], "test": ["yak", "kiwi"]}


def make_fss(root: Path, per_class: int = 4) -> Path:
    """``fewshot_data/<class>/<n>.jpg/png`` (masks 0/255) and HSNet's split lists."""
    for s, names in FSS_SPLITS.items():
        for ci, n in enumerate(names):
            for j in range(1, per_class + 1):
                write_jpeg(root / "fewshot_data" / n / f"{j}.jpg", 10, 8, seed=j)
                m = np.zeros((8, 10), dtype=np.uint8)
                m[2:6, j % 5:(j % 5) + 4] = 255
                m[0, 0] = 100  # below 128: background
                write_png(root / "fewshot_data" / n / f"{j}.png", m)
        d = root / "splits" / "fss"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{s}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


# ---------------------------------------------------------------------- ADE20K


def make_ade(root: Path) -> Path:
    """ADEChallengeData2016 with label PNGs (0 = other, k + 1 = class k)."""
    base = root / "ADEChallengeData2016"
    for sub, n in (("training", 8), ("validation", 4)):
        for i in range(n):
            stem = f"ADE_{'train' if sub == 'training' else 'val'}_{i + 1:08d}"
            write_jpeg(base / "images" / sub / f"{stem}.jpg", 12, 10, seed=i)
            lab = np.zeros((10, 12), dtype=np.uint8)  # 0 = other (ignored)
            lab[0:4, :] = 1 + (i % 3)          # classes 0, 1, 2
            lab[4:8, 0:6] = 1 + 149             # class 149 (flag) everywhere
            if i == 0:
                lab[9, 11] = 1 + 10             # class 10: a single pixel in one image
            write_png(base / "annotations" / sub / f"{stem}.png", lab)
    return root


# ---------------------------------------------------------------------- custom folder


def make_folder(root: Path) -> Path:
    """``<class>/images`` + ``<class>/masks``: cat (4), dog (3, one without mask), rare (1)."""
    for cls, n in (("cat", 4), ("dog", 3), ("rare", 1)):
        for j in range(n):
            write_jpeg(root / cls / "images" / f"{cls}{j}.jpg", 12, 10, seed=j)
            m = np.zeros((10, 12), dtype=np.uint8)
            m[2:8, 3:9] = 7 if cls == "cat" else 255
            write_png(root / cls / "masks" / f"{cls}{j}.png", m)
    write_jpeg(root / "dog" / "images" / "nomask.png", 12, 10)
    return root


# ---------------------------------------------------------------------- HSNet's split files, in their own order


def shuffle_hsnet_pascal_splits(root: Path, seed: int = 0) -> Path:
    """Rewrite the ``splits/pascal/*/fold<f>.txt`` of :func:`make_voc` with their lines in a random order (HSNet's
    files are not sorted by name), so that tests can tell file order from sorted order."""
    rng = np.random.default_rng(seed)
    for path in sorted((root / "splits" / "pascal").glob("*/fold*.txt")):
        lines = path.read_text().split("\n")[:-1]
        path.write_text("".join(f"{lines[i]}\n" for i in rng.permutation(len(lines))))
    return root


COCO_HSNET_SIZE = 8


def make_coco_hsnet(root: Path, fold: int = 0, num_images: int = 20, seed: int = 0) -> Path:
    """HSNet's COCO layout for ``val2014``: PNG masks (class id + 1) and ``splits/coco/val/fold<fold>.pkl`` whose
    per-class lists are in a random order (not sorted). Image ``j`` holds the fold's classes ``j, j + 1, j + 2``
    (positions mod 20, each class in 3 images) in rows 0-1, 2-3, 4-5, and label 255 in row 7."""
    tag = "val2014"
    classes = [fold + 4 * v for v in range(20)]
    classwise: dict[int, list[str]] = {c: [] for c in classes}
    for j in range(num_images):
        name = f"COCO_{tag}_{j:012d}"
        write_jpeg(root / tag / f"{name}.jpg", COCO_HSNET_SIZE, COCO_HSNET_SIZE, seed=j)
        lab = np.zeros((COCO_HSNET_SIZE, COCO_HSNET_SIZE), dtype=np.uint8)
        for k in range(3):
            c = classes[(j + k) % 20]
            lab[2 * k:2 * k + 2, :] = c + 1
            classwise[c].append(f"{tag}/{name}.jpg")
        lab[7, :] = 255
        write_png(root / "annotations" / tag / f"{name}.png", lab)
    rng = np.random.default_rng(seed)
    lists = {c: [v[i] for i in rng.permutation(len(v))] for c, v in classwise.items()}
    d = root / "splits" / "coco" / "val"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"fold{fold}.pkl", "wb") as fh:
        pickle.dump(lists, fh)
    return root


def make_lvis_matcher(root: Path, seed: int = 0) -> Path:
    """Matcher's LVIS layout: ``lvis_{train,val}.pkl`` (category -> image name -> ``{"annotations": [...]}``) with
    categories and image names in a random order (not sorted), images under ``coco/{train2017,val2017}``.
    Val: category ``k`` (of 23, key ``100 + 3k``) lies in images ``k, k + 1`` and, for even ``k``, ``k + 5`` (mod
    12); category 22 in one image only. Each annotation is a polygon box in columns ``x0 .. x0 + 3``,
    ``x0 = 1 + 4 (k mod 4)``."""
    rng = np.random.default_rng(seed)

    def build(folder_of, n_images, plan):
        names = []
        for i in range(n_images):
            name = f"{folder_of(i)}/{i:012d}.jpg"
            write_jpeg(root / "coco" / name, LVIS_W, LVIS_H, seed=i)
            names.append(name)
        data = {}
        for k in rng.permutation(LVIS_NUM_CATS):
            images = plan(int(k))
            x0 = 1 + (k % 4) * 4
            data[100 + 3 * int(k)] = {names[i]: {"annotations": [{"segmentation": [rect_polygon(x0, 2, x0 + 3, 12)],
                                                                  "category_id": 100 + 3 * int(k)}]}
                                      for i in rng.permutation(sorted(images))}
        return data

    def val_plan(k):
        return {k % 12} if k == 22 else {k % 12, (k + 1) % 12} | ({(k + 5) % 12} if k % 2 == 0 else set())

    val = build(lambda i: "val2017" if i % 2 == 0 else "train2017", 12, val_plan)
    train = build(lambda i: "train2017", 6, lambda k: {k % 6, (k + 2) % 6})
    for split, data in (("val", val), ("train", train)):
        with open(root / f"lvis_{split}.pkl", "wb") as f:
            pickle.dump(data, f)
    return root
