"""Shared machinery of the real-data plugins (Stanford Dogs, Stanford Cars, CUB-200-2011,
FGVC-Aircraft): finding the dataset under ``--data-root``, layout detection with error messages that
say what was expected and where we looked, lazy PIL image loading with errors naming the file, the
CoOp/Dassl ``split_zhou_*.json`` reader, ``.mat`` helpers, and an optional decoded-image cache.

Every plugin accepts these dataset options (``dataset_options: {<dataset>: {...}}`` in an
experiment YAML):

* ``layout``: ``auto`` (default: the official archive files when present, else the CoOp/Dassl split
  JSON), ``official`` or ``coop``.
* ``image_cache``: ``null`` (default, off) or a short-side size in pixels (e.g. ``256``). Images are
  then decoded once, resized so that their shorter side is at most that size (aspect ratio kept,
  bicubic, never upscaled) and stored as raw RGB ``uint8`` in one memory-mapped ``.npy`` per split
  under ``results/cache/images/`` (or ``$OSSL_IMAGE_CACHE_DIR``), keyed by a hash of the file list
  (relative paths and byte sizes) and the size. Later runs read pixels straight from the page cache
  instead of decoding JPEGs. The pixels differ slightly from decoding the original file (one extra
  resize), so the option is part of the run's config hash and of the feature-cache key; choose a
  size >= 1.15 x the backbone's input size (256 for 224-px models, 384 for 336-px ones).

Sample ids are image paths relative to the dataset folder, the same in every layout (the path from
the image folder on, e.g. ``images/001.Black_footed_Albatross/...jpg``).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from benchmark import ROOT
from benchmark.data import DatasetPlugin, Split
from benchmark.errors import ConfigError, DatasetError, nearest

IMAGE_CACHE_ENV = "OSSL_IMAGE_CACHE_DIR"
CACHE_VERSION = 1
SPLITS = ("train", "test")


# -- image loading -----------------------------------------------------------------------------
def load_image(path: Path) -> Image.Image:
    """Decode ``path`` as an RGB PIL image; a missing or corrupt file raises :class:`DatasetError`
    naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image file {path} is missing: the dataset's split files list it. Re-extract "
                           f"the archive, or check --data-root.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"could not decode image {path} ({type(exc).__name__}: {exc}): the file is "
                           f"corrupt or truncated. Re-extract it from the dataset archive.") from exc


class CropBottom:
    """Removes the bottom ``pixels`` rows of an image (FGVC-Aircraft's copyright banner)."""

    def __init__(self, pixels: int):
        self.pixels = int(pixels)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if h <= self.pixels:
            raise DatasetError(f"an image of height {h} px has no rows left after cropping its bottom "
                               f"{self.pixels} px")
        return img.crop((0, 0, w, h - self.pixels))

    def size(self, w: int, h: int) -> Tuple[int, int]:
        return w, h - self.pixels

    def __repr__(self) -> str:
        return f"crop_bottom={self.pixels}"


class FileImageLoader:
    """``loader(i)`` of a :class:`Split`: decodes ``base / ids[i]`` on demand (picklable for
    DataLoader workers); ``op`` (e.g. :class:`CropBottom`) is applied to every decoded image."""

    def __init__(self, base: Path, ids: Sequence[str], op=None):
        self.base = Path(base)
        self.ids = list(ids)
        self.op = op

    def __call__(self, i: int) -> Image.Image:
        img = load_image(self.base / self.ids[i])
        return self.op(img) if self.op is not None else img


# -- layouts -----------------------------------------------------------------------------------
@dataclass
class Layout:
    """One on-disk layout: ``markers`` are required entries, each a tuple of alternatives (a path
    relative to the dataset folder; a trailing ``/`` means a folder)."""

    name: str  # "official" | "coop"
    describe: str
    markers: Tuple[Tuple[str, ...], ...]

    def missing(self, folder: Path) -> List[str]:
        out = []
        for alts in self.markers:
            if not any(_exists(folder, a) for a in alts):
                out.append(" or ".join(alts))
        return out

    def find(self, folder: Path, alts: Tuple[str, ...]) -> Path:
        for a in alts:
            if _exists(folder, a):
                return folder / a.rstrip("/")
        raise DatasetError(f"none of {', '.join(alts)} in {folder}")


def _exists(folder: Path, rel: str) -> bool:
    p = folder / rel.rstrip("/")
    return p.is_dir() if rel.endswith("/") else p.is_file()


@dataclass
class Index:
    """What a plugin reads from the annotation files: class names (canonical order) and, per split,
    sample ids (relative paths) and labels. ``image_base / id`` is the image file."""

    folder: Path
    layout: str
    classnames: List[str]
    splits: Dict[str, Tuple[List[str], np.ndarray]]
    image_base: Path
    notes: Dict[str, str] = field(default_factory=dict)


class RealDataset(DatasetPlugin):
    """Base of the real-data plugins. Subclasses give ``folder_names`` (subfolders of the data root
    where the dataset may live, most conventional first), ``layouts`` and the readers."""

    needs_root = True
    title: ClassVar[str] = ""
    folder_names: ClassVar[Tuple[str, ...]] = ()
    layouts: ClassVar[Tuple[Layout, ...]] = ()
    # official (classes, train pool, test) sizes, for a warning on partial copies
    official_sizes: ClassVar[Tuple[int, int, int]] = (0, 0, 0)
    extra_options: ClassVar[Dict[str, object]] = {}
    option_ranges = {"image_cache": ("[16, inf)", True, ("0", "off", "none"))}  # null/off: no cache

    def __init__(self, root=None, layout: str = "auto", image_cache=None, **options):
        valid = {"layout", "image_cache", *self.extra_options}
        for k in options:
            if k not in self.extra_options:
                raise ConfigError(f"{self.name}: unknown dataset option {k!r}; did you mean "
                                  f"{nearest(k, valid)!r}? Valid options: {', '.join(sorted(valid))}.")
        opts = {**self.extra_options, **options}
        super().__init__(root, **opts)
        if layout not in ("auto", "official", "coop"):
            raise ConfigError(f"{self.name}: layout must be auto, official or coop, got {layout!r}")
        self.layout = layout
        if image_cache in (None, False, 0, "off", "none"):
            self.image_cache: Optional[int] = None
        else:
            try:
                self.image_cache = int(image_cache)
            except (TypeError, ValueError):
                raise ConfigError(f"{self.name}: image_cache must be null or a short-side size in pixels "
                                  f"(e.g. 256), got {image_cache!r}") from None
            if self.image_cache < 16:
                raise ConfigError(f"{self.name}: image_cache={image_cache!r} is too small a short side")
        self._index: Optional[Index] = None
        self._splits: Dict[str, Split] = {}

    # -- what subclasses implement ----------------------------------------------------------------
    def read(self, folder: Path, layout: Layout) -> Index:
        raise NotImplementedError

    def expected_sizes(self) -> Tuple[int, int, int]:
        return self.official_sizes

    def pixel_op(self):
        """A picklable callable applied to every decoded image (before the image cache resizes
        it), or None. FGVC-Aircraft's ``crop_banner`` uses it."""
        return None

    # -- locating the dataset ---------------------------------------------------------------------
    def candidate_folders(self) -> List[Path]:
        if self.root is None:
            raise DatasetError(f"dataset {self.name!r} needs a data root: pass --data-root DIR")
        root = Path(os.path.expanduser(str(self.root)))
        out: List[Path] = []
        for n in self.folder_names:
            p = root / n
            if p not in out:
                out.append(p)
        if root not in out:
            out.append(root)
        return out

    def allowed_layouts(self) -> List[Layout]:
        if self.layout == "auto":
            return list(self.layouts)
        return [lay for lay in self.layouts if lay.name == self.layout]

    def locate(self) -> Tuple[Path, Layout]:
        """The first candidate folder holding a complete allowed layout (official before coop)."""
        cands = self.candidate_folders()
        lays = self.allowed_layouts()
        for folder in cands:
            if not folder.is_dir():
                continue
            for lay in lays:
                if not lay.missing(folder):
                    return folder, lay
        raise DatasetError(self.layout_error(cands, lays))

    def layout_error(self, cands: List[Path], lays: List[Layout]) -> str:
        lines = [f"{self.title or self.name}: no dataset found under --data-root {self.root}"
                 + (f" (layout={self.layout})" if self.layout != "auto" else "") + ".",
                 "Expected one of these layouts:"]
        for lay in lays:
            lines.append(f"  {lay.name}: {lay.describe}")
        lines.append("in one of these folders (where we looked):")
        for folder in cands:
            if not folder.is_dir():
                lines.append(f"  {folder}  (no such folder)")
                continue
            parts = []
            for lay in lays:
                miss = lay.missing(folder)
                have = len(lay.markers) - len(miss)
                if have:
                    parts.append(f"{lay.name} layout incomplete, missing {', '.join(miss)}")
            lines.append(f"  {folder}  ({'; '.join(parts) if parts else 'none of the expected files'})")
        lines.append("See README.md, section 'Reproducing the paper', for the data preparation steps.")
        return "\n".join(lines)

    # -- the plugin API ---------------------------------------------------------------------------
    def index(self) -> Index:
        if self._index is None:
            folder, lay = self.locate()
            idx = canonical_order(self.read(folder, lay))
            self._validate(idx)
            self._index = idx
        return self._index

    def classnames(self) -> List[str]:
        return list(self.index().classnames)

    def load(self, split: str) -> Split:
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split not in self._splits:
            idx = self.index()
            ids, labels = idx.splits[split]
            op = self.pixel_op()
            if self.image_cache:
                cache = ImageCache(image_cache_dir(), self.image_cache)
                loader = cache.open_or_build(f"{self.name}-{split}", idx.image_base, ids, op)
                variant = f"image_cache={self.image_cache}"
            else:
                loader, variant = FileImageLoader(idx.image_base, ids, op), ""
            if op is not None:  # other pixels: part of the frozen-feature cache key
                variant = ",".join(v for v in (variant, repr(op)) if v)
            s = Split(ids=list(ids), labels=labels, loader=loader, variant=variant)
            self._splits[split] = s
        return self._splits[split]

    def _validate(self, idx: Index) -> None:
        C = len(idx.classnames)
        where = f"{self.name} ({idx.layout} layout in {idx.folder})"
        if C == 0:
            raise DatasetError(f"{where}: no classes found")
        if len(set(idx.classnames)) != C:
            dup = sorted({c for c in idx.classnames if idx.classnames.count(c) > 1})
            raise DatasetError(f"{where}: duplicate class names {dup[:5]}")
        for s in SPLITS:
            ids, labels = idx.splits[s]
            if len(ids) == 0:
                raise DatasetError(f"{where}: the {s} split is empty")
            if labels.min() < 0 or labels.max() >= C:
                raise DatasetError(f"{where}: {s} labels outside [0, {C})")
            first = idx.image_base / ids[0]
            if not first.is_file():  # a wrong image folder is caught here, not mid-run
                raise DatasetError(f"{where}: the first {s} image {first} does not exist; the image "
                                   f"folder is missing or misplaced")
        exp = self.expected_sizes()
        got = (C, len(idx.splits["train"][0]), len(idx.splits["test"][0]))
        if exp[0] and got != exp:
            warnings.warn(f"{where}: {got[0]} classes, {got[1]} train and {got[2]} test images; the "
                          f"official dataset has {exp[0]} / {exp[1]} / {exp[2]}. Results will not be "
                          f"comparable to the paper's.", UserWarning, stacklevel=3)


def canonical_order(idx: Index) -> Index:
    """Each split's samples sorted by id (their relative path): the order, and so the split
    manifest, the unlabeled stream and the test order, no longer depend on which layout's files
    listed them (CoOp's JSON lists Stanford Cars' training images in another order than the devkit)."""
    for s, (ids, labels) in list(idx.splits.items()):
        order = sorted(range(len(ids)), key=list(ids).__getitem__)
        idx.splits[s] = ([ids[i] for i in order], np.asarray(labels, dtype=np.int64)[order])
    return idx


# -- readers shared by the plugins ---------------------------------------------------------------
def read_lines(path: Path) -> List[str]:
    try:
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not a text file ({exc})") from exc


def read_coop_split(path: Path) -> Dict[str, List[Tuple[str, int, str]]]:
    """A CoOp/Dassl ``split_zhou_<Name>.json``: ``{"train"|"val"|"test": [[path, label, classname]]}``."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or "train" not in data or "test" not in data:
        raise DatasetError(f"{path}: expected a mapping with 'train', 'val' and 'test' lists of "
                           f"[relative image path, label, class name] (CoOp's split format)")
    out = {}
    for key in ("train", "val", "test"):
        items = data.get(key, [])
        rows = []
        for it in items:
            if not (isinstance(it, (list, tuple)) and len(it) == 3):
                raise DatasetError(f"{path}: {key} entries must be [path, label, classname], got {it!r}")
            rows.append((str(it[0]), int(it[1]), str(it[2])))
        out[key] = rows
    return out


def _clean_rel(rel: str) -> str:
    rel = rel.replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    return rel


def resolve_image_base(folder: Path, rel: str, anchors: Sequence[str],
                       extra: Sequence[Path] = ()) -> Tuple[Path, Path]:
    """Where the JSON paths lie. ``rel`` (the first path of the split file) is tried relative to
    ``folder``, to each ``anchors`` image folder under it and to the ``extra`` folders (the split
    file's own folder). Returns ``(rel_base, base)``: JSON paths are relative to ``rel_base``;
    sample ids are relative to ``base``, the folder holding the anchor (image) folder, so that ids
    agree with the official layout's."""
    rel = _clean_rel(rel)
    tries = [folder] + [folder / a for a in anchors] + [Path(e) for e in extra]
    for t in tries:
        full = t / rel
        if full.is_file():
            parts = full.parts
            for i in range(len(parts) - 2, 0, -1):  # the innermost anchor folder above the file
                if parts[i] in anchors:
                    return t, Path(*parts[:i])
            return t, folder
    raise DatasetError(f"image {rel!r} of the split file was not found (tried "
                       f"{', '.join(str(t / rel) for t in tries)})")


def coop_index(folder: Path, json_path: Path, anchors: Sequence[str], pool: Sequence[str] = ("train", "val"),
               name_of=None) -> Index:
    """An :class:`Index` from a CoOp split JSON: the unlabeled pool is the union of ``pool``
    (train + val: CoOp's train/val are a split of the official training set) and test is test.
    ``name_of(sample_id, json_classname)`` gives the class name (default: the JSON's)."""
    sp = read_coop_split(json_path)
    first = (sp["train"] or sp["test"])
    if not first:
        raise DatasetError(f"{json_path}: the split file lists no images")
    rel_base, base = resolve_image_base(folder, first[0][0], anchors, extra=[json_path.parent])
    shift = os.path.relpath(rel_base, base)  # "." or e.g. "images" or ".."
    names: Dict[int, str] = {}
    splits = {}
    for s, keys in (("train", pool), ("test", ("test",))):
        ids, labels = [], []
        for k in keys:
            for p, lab, cname in sp[k]:
                p = _clean_rel(p)
                sid = p if shift == "." else os.path.relpath(os.path.join(rel_base, p), base).replace(os.sep, "/")
                if sid.startswith("../"):
                    raise DatasetError(f"{json_path}: image {p!r} lies outside the dataset folder {base}")
                nm = name_of(sid, cname) if name_of else cname
                if names.setdefault(lab, nm) != nm:
                    raise DatasetError(f"{json_path}: label {lab} has two class names, {names[lab]!r} "
                                       f"and {nm!r}")
                ids.append(sid)
                labels.append(lab)
        splits[s] = (ids, np.asarray(labels, dtype=np.int64))
    C = max(names) + 1
    if min(names) < 0 or sorted(names) != list(range(C)):
        raise DatasetError(f"{json_path}: labels must be 0..C-1 without gaps; found {len(names)} labels "
                           f"up to {C - 1}")
    return Index(folder=folder, layout="coop", classnames=[names[c] for c in range(C)], splits=splits,
                 image_base=base, notes={"split_file": str(json_path)})


def mat_str(x) -> str:
    """A MATLAB char array as loaded by scipy.io.loadmat (possibly nested in 1x1 cells)."""
    while isinstance(x, np.ndarray):
        if x.size != 1:
            raise DatasetError(f"expected one string in the .mat file, got an array of shape {x.shape}")
        x = x.reshape(-1)[0]
    return str(x)


def mat_int(x) -> int:
    return int(np.asarray(x).reshape(-1)[0])


def loadmat(path: Path) -> dict:
    from scipy.io import loadmat as _lm

    try:
        return _lm(str(path))
    except Exception as exc:  # noqa: BLE001 - scipy raises several types for a bad file
        raise DatasetError(f"could not read the MATLAB file {path} ({type(exc).__name__}: {exc})") from exc


# -- decoded-image cache -------------------------------------------------------------------------
def image_cache_dir() -> Path:
    return Path(os.environ.get(IMAGE_CACHE_ENV) or (ROOT / "results" / "cache" / "images"))


def resized_size(w: int, h: int, short: int) -> Tuple[int, int]:
    """(w, h) scaled so that the shorter side is ``short``; images already smaller are kept."""
    s = min(w, h)
    if s <= short:
        return w, h
    f = short / s
    return max(1, round(w * f)), max(1, round(h * f))


def decode_resized(path: Path, short: int, op=None) -> np.ndarray:
    img = load_image(path)
    if op is not None:
        img = op(img)
    size = resized_size(*img.size, short)
    if size != img.size:
        img = img.resize(size, Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _header_size(path: Path) -> Tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DatasetError(f"image file {path} is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"could not decode image {path} ({type(exc).__name__}: {exc}): the file is "
                           f"corrupt or truncated") from exc


def _fill(data_path: str, paths: List[str], offsets: List[int], nbytes: List[int], short: int,
          op=None) -> None:
    data = np.load(data_path, mmap_mode="r+")
    for p, off, n in zip(paths, offsets, nbytes):
        arr = decode_resized(Path(p), short, op)
        if arr.size != n:
            raise DatasetError(f"image {p} decoded to {arr.shape}, not the size its header announced; "
                               f"the file changed while the image cache was built: rerun")
        data[off:off + n] = arr.reshape(-1)
    data.flush()
    del data


class CachedImageLoader:
    """``loader(i)`` reading image ``i`` from the flat memory-mapped cache (opened lazily in each
    process, so the loader pickles cheaply into DataLoader workers)."""

    def __init__(self, data_path: Path, index_path: Path):
        self.data_path, self.index_path = Path(data_path), Path(index_path)
        self._data = self._index = None

    def _open(self):
        if self._data is None:
            self._data = np.load(self.data_path, mmap_mode="r")
            self._index = np.load(self.index_path)

    def array(self, i: int) -> np.ndarray:
        self._open()
        off, h, w = (int(v) for v in self._index[i])
        return np.array(self._data[off:off + h * w * 3]).reshape(h, w, 3)

    def __call__(self, i: int) -> Image.Image:
        return Image.fromarray(self.array(i), mode="RGB")

    def __len__(self) -> int:
        self._open()
        return len(self._index)

    def __getstate__(self):
        return {"data_path": self.data_path, "index_path": self.index_path, "_data": None, "_index": None}


class ImageCache:
    """Decoded, resized images of a split in ``<name>-s<size>-<key>.npy`` (flat ``uint8``) plus
    ``...-index.npy`` (``[N, 3]``: offset, height, width). The key hashes the file list (ids and
    byte sizes), the size and the cache format version."""

    def __init__(self, folder: Path, short_side: int, workers: Optional[int] = None):
        self.folder = Path(folder)
        self.short = int(short_side)
        self.workers = workers if workers is not None else min(8, os.cpu_count() or 1)

    def key(self, base: Path, ids: Sequence[str], op=None) -> str:
        h = hashlib.sha256(f"v{CACHE_VERSION}|short={self.short}\n".encode())
        if op is not None:
            h.update(f"op={op!r}\n".encode())
        for sid in ids:
            try:
                size = (base / sid).stat().st_size
            except FileNotFoundError:
                raise DatasetError(f"image file {base / sid} is missing") from None
            h.update(f"{sid}\t{size}\n".encode())
        return h.hexdigest()[:20]

    def paths(self, name: str, key: str) -> Tuple[Path, Path]:
        stem = f"{name}-s{self.short}-{key}"
        return self.folder / f"{stem}.npy", self.folder / f"{stem}-index.npy"

    def open_or_build(self, name: str, base: Path, ids: Sequence[str], op=None) -> CachedImageLoader:
        data_path, index_path = self.paths(name, self.key(base, ids, op))
        if not (data_path.exists() and index_path.exists()):
            self.build(base, ids, data_path, index_path, op)
        return CachedImageLoader(data_path, index_path)

    def build(self, base: Path, ids: Sequence[str], data_path: Path, index_path: Path, op=None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        files = [base / sid for sid in ids]
        heads = [_header_size(p) for p in files]
        dims = [resized_size(*(op.size(*wh) if op is not None else wh), self.short) for wh in heads]
        sizes = np.array([w * h * 3 for w, h in dims], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        index = np.stack([offsets, [h for _, h in dims], [w for w, _ in dims]], axis=1).astype(np.int64)
        tmp = data_path.with_name(f".{data_path.name}.{os.getpid()}.tmp.npy")
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(int(sizes.sum()),)).flush()
        try:
            paths, offs, nb = [str(p) for p in files], offsets.tolist(), sizes.tolist()
            if self.workers <= 1 or len(files) < 512:
                _fill(str(tmp), paths, offs, nb, self.short, op)
            else:
                n = self.workers * 4
                with ProcessPoolExecutor(self.workers) as ex:
                    futs = [ex.submit(_fill, str(tmp), paths[i::n], offs[i::n], nb[i::n], self.short, op)
                            for i in range(n)]
                    for f in futs:
                        f.result()
            os.replace(tmp, data_path)
        finally:
            if tmp.exists():
                tmp.unlink()
        itmp = index_path.with_name(f".{index_path.name}.{os.getpid()}.tmp.npy")
        np.save(itmp, index)
        os.replace(itmp, index_path)  # the index appears last: its presence means complete
