"""Transforms, deterministic batch streams and the frozen-feature cache.

Resumable determinism: the images of optimisation step ``s`` are a pure function of (seed, stream,
s): each epoch's order is a permutation drawn from ``(seed, stream, epoch)`` and each sample's
augmentation runs under its own RNG seed drawn from ``(seed, stream, epoch, position)``. A resumed run
therefore needs only the step counter to see exactly the images an uninterrupted run sees, with any
number of loader workers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as torchvision_F

from .data import Split
from .io import atomic_torch_save

STREAMS = {"labeled": 1, "unlabeled": 2, "setup": 3}  # "setup": augmented views served to Method.setup


def _interp(name: str):
    return {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
            "nearest": T.InterpolationMode.NEAREST}.get(str(name), T.InterpolationMode.BICUBIC)


def build_transforms(preprocess_cfg: dict, data_cfg) -> Dict[str, Callable]:
    """The views a method may ask for, with the backbone's own size, mean, std and interpolation."""
    size = preprocess_cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
    std = preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
    interp = _interp(preprocess_cfg.get("interpolation", "bicubic"))
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    weak = [T.RandomResizedCrop(size, scale=tuple(data_cfg.crop_scale), interpolation=interp),
            T.RandomHorizontalFlip()]
    return {
        "weak": T.Compose(weak + norm),
        "strong": T.Compose(weak + [T.RandAugment(data_cfg.randaugment_n, data_cfg.randaugment_m)] + norm),
        "test": T.Compose([T.Resize(size, interpolation=interp), T.CenterCrop(size)] + norm),
    }


def sample_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint32)[0])


@dataclass
class ViewBatch:
    """What a loader yields: the images of each requested view and the samples' positions in the
    :class:`Split` (``index``; ``split.ids[i]`` is the sample id, ``split.labels[i]`` its label).
    Labels are not carried: the engine attaches them to the labeled stream only. ``batch["test"]``
    reads a view."""

    views: Dict[str, torch.Tensor]
    index: torch.Tensor  # int64 [B], positions in the split

    def __getitem__(self, view: str) -> torch.Tensor:
        return self.views[view]

    def pin_memory(self) -> "ViewBatch":  # called by DataLoader(pin_memory=True)
        return ViewBatch({k: v.pin_memory() for k, v in self.views.items()}, self.index.pin_memory())


class Unnormalised:
    """A view's image as uint8 ``[C, H, W]`` with the ``ToTensor`` + ``Normalize(mean, std)`` of its
    transform still to apply: :func:`_collate` applies them to the whole batch at once
    (``data.batch_normalize``), the same element-wise float operations, so the same numbers."""

    __slots__ = ("pixels", "mean", "std")

    def __init__(self, pixels: torch.Tensor, mean, std):
        self.pixels, self.mean, self.std = pixels, mean, std


def _normalise_tail(transform: Callable):
    """``(head, to_tensor, normalize)`` when ``transform`` is a ``Compose`` ending in ``ToTensor()``
    and ``Normalize`` (what :func:`build_transforms` makes), else None."""
    ts = getattr(transform, "transforms", None)
    if (isinstance(transform, T.Compose) and ts and len(ts) >= 2 and type(ts[-2]) is T.ToTensor
            and type(ts[-1]) is T.Normalize and not ts[-1].inplace):
        return T.Compose(ts[:-2]), ts[-2], ts[-1]
    return None


class ViewDataset(Dataset):
    """Items are ``(index, aug_seed)`` pairs; returns ``({view: tensor}, index)`` for the requested
    views. ``batch_normalize``: views whose transform ends in ``ToTensor`` + ``Normalize`` come as
    :class:`Unnormalised` uint8 images, normalised by :func:`_collate` for the whole batch."""

    def __init__(self, split: Split, views: Dict[str, Callable], batch_normalize: bool = False):
        self.split = split
        self.views = views
        self.tails = {k: _normalise_tail(t) if batch_normalize else None for k, t in views.items()}

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item) -> Tuple[Dict[str, torch.Tensor], int]:
        idx, seed = item if isinstance(item, tuple) else (item, 0)
        if not self.views:  # a method that reads no images of this stream (e.g. engine-served features)
            return {}, int(idx)
        img = self.split.image(int(idx))
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (what the transforms draw from): torch.manual_seed would also
            # queue a CUDA reseed with a stack trace per call (slow, and not restored by fork_rng)
            torch.default_generator.manual_seed(seed)
            out = {name: self._view(name, t, img) for name, t in self.views.items()}
        return out, int(idx)

    def _view(self, name: str, t: Callable, img):
        tail = self.tails.get(name)
        if tail is None:
            return t(img)
        head, to_tensor, norm = tail
        pic = head(img)
        if not (isinstance(pic, Image.Image) and pic.mode == "RGB"):
            return norm(to_tensor(pic))  # the transform's own tail (what t(img) computes)
        return Unnormalised(torchvision_F.pil_to_tensor(pic), norm.mean, norm.std)


class StepBatches:
    """Index batches of one stream for steps ``[start, stop)``; Dassl's drop_last when n >= bs."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, stream: str,
                 start: int, stop: int):
        self.indices = np.asarray(indices)
        self.bs = int(batch_size)
        self.seed = int(seed)
        self.stream = STREAMS[stream]
        self.start, self.stop = int(start), int(stop)

    @staticmethod
    def steps_per_epoch(n: int, batch_size: int) -> int:
        return max(1, n // batch_size) if n >= batch_size else 1

    def batch(self, step: int) -> List[Tuple[int, int]]:
        n = len(self.indices)
        spe = self.steps_per_epoch(n, self.bs)
        epoch, b = divmod(step, spe)
        perm = np.random.default_rng([self.seed, self.stream, epoch]).permutation(n)
        pos = perm[b * self.bs:(b + 1) * self.bs]
        return [(int(self.indices[p]), sample_seed(self.seed, self.stream, epoch, b * self.bs + k))
                for k, p in enumerate(pos)]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for s in range(self.start, self.stop):
            yield self.batch(s)

    def __len__(self) -> int:
        return self.stop - self.start


def _collate(items: List[Tuple[Dict[str, torch.Tensor], int]]) -> ViewBatch:
    views = {k: _stack([v[k] for v, _ in items]) for k in items[0][0]}
    return ViewBatch(views, torch.tensor([i for _, i in items], dtype=torch.int64))


def _stack(xs: List) -> torch.Tensor:
    """Stack a view's images; :class:`Unnormalised` ones get torchvision's ``to_tensor`` (float,
    / 255) and ``normalize`` (``sub_(mean).div_(std)``) once for the batch: element-wise the same
    operations, so each image equals its transform's own output bit for bit."""
    if not any(isinstance(x, Unnormalised) for x in xs):
        return torch.stack(xs)
    if not all(isinstance(x, Unnormalised) and x.mean == xs[0].mean and x.std == xs[0].std for x in xs):
        xs = [_finish(x) for x in xs]
        return torch.stack(xs)
    x = torch.stack([u.pixels for u in xs]).contiguous().to(dtype=torch.get_default_dtype()).div(255)
    return torchvision_F.normalize(x, xs[0].mean, xs[0].std, inplace=True)


def _finish(x):
    if not isinstance(x, Unnormalised):
        return x
    return torchvision_F.normalize(x.pixels.contiguous().to(dtype=torch.get_default_dtype()).div(255), x.mean, x.std,
                                   inplace=True)


def stream_loader(split: Split, indices: np.ndarray, views: Dict[str, Callable], batch_size: int,
                  seed: int, stream: str, start: int, stop: int, num_workers: int = 0,
                  pin_memory: bool = False, batch_normalize: bool = False) -> DataLoader:
    return DataLoader(ViewDataset(split, views, batch_normalize),
                      batch_sampler=StepBatches(indices, batch_size, seed, stream, start, stop),
                      collate_fn=_collate, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False)


def items_loader(split: Split, views: Dict[str, Callable], items: Sequence[Tuple[int, int]], batch_size: int,
                 num_workers: int = 0, pin_memory: bool = False, batch_normalize: bool = False) -> DataLoader:
    """The ``(position in split, augmentation seed)`` items in order, ``batch_size`` at a time."""
    batches = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    return DataLoader(ViewDataset(split, views, batch_normalize), batch_sampler=batches, collate_fn=_collate,
                      num_workers=num_workers, pin_memory=pin_memory)


def eval_loader(split: Split, indices: np.ndarray, transform: Callable, batch_size: int,
                num_workers: int = 0, pin_memory: bool = False, batch_normalize: bool = False) -> DataLoader:
    return items_loader(split, {"test": transform}, [(int(i), 0) for i in indices], batch_size, num_workers,
                        pin_memory, batch_normalize)


class EvalImageMemo:
    """Evaluation images (the test transform, deterministic) kept in memory after their first use
    (``eval.memo_mb``), so the next run on the same dataset gets the same tensors without loading
    and transforming its images again. Keyed by the caller's description of the split (dataset,
    options, which split, its content fingerprint) and the transform; entries are added while the
    memo holds less than its budget, then batches are assembled from what is memoised plus freshly
    loaded images. A batch is the same tensor :func:`eval_loader` yields, bit for bit."""

    def __init__(self, budget_mb: float):
        self.budget = float(budget_mb) * 2 ** 20
        self.used = 0
        self._images: Dict[str, Dict[int, torch.Tensor]] = {}

    def batches(self, key: str, split: Split, indices: Sequence[int], transform: Callable, batch_size: int,
                num_workers: int = 0, pin_memory: bool = False,
                batch_normalize: bool = False) -> Iterator[torch.Tensor]:
        entry = self._images.setdefault(key, {})
        idx = [int(i) for i in indices]
        todo = [i for i in dict.fromkeys(idx) if i not in entry]
        fresh: Dict[int, torch.Tensor] = {}
        if todo:
            for b in eval_loader(split, np.asarray(todo), transform, batch_size, num_workers, pin_memory,
                                 batch_normalize):
                for i, x in zip(b.index.tolist(), b["test"]):
                    fresh[i] = x
            for i in todo:
                size = fresh[i].numel() * fresh[i].element_size()
                if self.used + size > self.budget:
                    break
                entry[i] = fresh[i]
                self.used += size
        for s in range(0, len(idx), batch_size):
            yield torch.stack([entry[i] if i in entry else fresh[i] for i in idx[s:s + batch_size]])


@torch.no_grad()
def encode_items(backbone, split: Split, transform: Callable, items: Sequence[Tuple[int, int]],
                 batch_size: int, device, autocast, num_workers: int = 0,
                 fields: Sequence[str] = ("pooled",)) -> Dict[str, torch.Tensor]:
    """The frozen image tower's outputs ``{field: [len(items), ...]}`` (CPU, fp32, in ``items``
    order) of the ``(position in split, augmentation seed)`` items under ``transform``, encoded
    ``batch_size`` images at a time (no items: pooled features of shape [0, E])."""
    outs: Dict[str, List[torch.Tensor]] = {f: [] for f in fields}
    for b in items_loader(split, {"v": transform}, items, batch_size, num_workers):
        with autocast():
            o = backbone.encode_image(b["v"].to(device), return_value_local="value_local" in fields,
                                      return_patches="patches" in fields)
        for f in fields:
            outs[f].append(getattr(o, f).float().cpu())
    return {f: torch.cat(v) if v else torch.zeros(0, backbone.embed_dim) for f, v in outs.items()}


def encode_augmented(backbone, split: Split, indices: np.ndarray, transform: Callable, rounds: int,
                     seed: int, batch_size: int, device, autocast, num_workers: int = 0) -> torch.Tensor:
    """Pooled CLIP features [rounds, N, E] (CPU, fp32) of ``rounds`` augmentations of each image
    ``indices``; sample ``k``'s augmentation in round ``r`` is seeded by (seed, "setup", r, k), so the
    result is deterministic per seed (and independent of the batch size and of workers)."""
    out = [encode_items(backbone, split, transform,
                        [(int(i), sample_seed(seed, STREAMS["setup"], r, k)) for k, i in enumerate(indices)],
                        batch_size, device, autocast, num_workers)["pooled"] for r in range(int(rounds))]
    return torch.stack(out) if out else torch.zeros(0, len(indices), backbone.embed_dim)


def _tower_tag(backbone) -> str:
    """Part of a feature-cache key: features computed through ``sdpa_blocks`` (equal up to float
    rounding) are kept apart from the blocks' own forward, whose keys stay as they always were;
    ``cls_last``: their last block computes the CLS query alone (rounds differently from the
    caches written before it did, which are therefore not served)."""
    return "|sdpa_blocks|cls_last" if getattr(backbone, "sdpa_blocks", False) else ""


class FeatureCache:
    """Frozen CLIP image features (eval transform) of a dataset split, on disk.

    Keyed by the backbone's identity (the checkpoint's SHA-256 or name:tag), the dataset, the split's
    content fingerprint and the transform, so a changed checkpoint or dataset never serves stale
    features. Shared by every method and seed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @staticmethod
    def key(backbone_identity: str, dataset: str, split: Split, transform_desc: str) -> str:
        raw = "|".join([backbone_identity, dataset, split.fingerprint(), transform_desc]
                       + ([split.variant] if getattr(split, "variant", "") else []))
        return hashlib.sha256(raw.encode()).hexdigest()[:24]

    def get(self, backbone, dataset: str, split: Split, transform: Callable, batch_size: int,
            device, autocast, num_workers: int = 0) -> torch.Tensor:
        key = self.key(backbone.identity, dataset, split, repr(transform) + _tower_tag(backbone))
        path = self.folder / f"{dataset}-{key}.pt"
        if path.exists():
            try:
                return torch.load(path, map_location="cpu")
            except Exception:  # noqa: BLE001 - a corrupt cache file is recomputed
                path.unlink(missing_ok=True)
        out = encode_items(backbone, split, transform, [(i, 0) for i in range(len(split))], batch_size,
                           device, autocast, num_workers)["pooled"]
        atomic_torch_save(path, out)
        return out


# data.num_workers: null [default] -> at most this many workers on CUDA (one per CPU up to 8: JPEG
# decoding of a ViT-L/14 grid keeps about 8 busy; more only adds memory)
AUTO_WORKERS_MAX = 8


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or a job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(requested: Optional[int], device) -> int:
    """The loader worker count of a run: ``requested`` when set; otherwise 0 on CPU (the model
    already uses every core through torch's threads, and workers would compete with it and start up
    again for every loader) and ``min(AUTO_WORKERS_MAX, available_cpus())`` on CUDA, never more
    workers than CPUs (DataLoader warns about that, and they would only contend)."""
    if requested is not None:
        return int(requested)
    if getattr(device, "type", str(device)) != "cuda":
        return 0
    return min(AUTO_WORKERS_MAX, available_cpus())


def with_loader_workers(cfg, device):
    """``cfg`` with ``data.num_workers`` resolved by :func:`loader_workers` (a copy; the field is
    not part of the config hash)."""
    n = loader_workers(cfg.data.num_workers, device)
    if n == cfg.data.num_workers:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=n))


class ViewFeatureCache:
    """Frozen image-tower outputs of a fixed number of augmented train views per training image
    (``data.cached_views``), for methods whose training step reads the frozen image tower only
    (``Method.frozen_train_outputs``).

    View ``v`` of sample ``id`` is the train transform under the RNG seed ``(stream 4, v, crc32(id))``:
    it depends on neither the run's seed nor the method, so every method and seed of a grid shares
    the entries (kept in memory by the engine and on disk, keyed like :class:`FeatureCache` plus the
    number of views). A training step picks view ``aug_seed % views`` for each sample, where
    ``aug_seed`` is the seed the loader would have augmented it with. Entries are filled on demand
    (:meth:`ensure`) and written by :meth:`flush`; a corrupt file is recomputed."""

    STREAM = 4  # after STREAMS' labeled 1, unlabeled 2, setup 3

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._entries: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}  # key -> id -> field -> [V, ...]
        self._dirty: Dict[str, Path] = {}

    @staticmethod
    def view_seed(sample_id: str, view: int) -> int:
        import zlib

        return sample_seed(ViewFeatureCache.STREAM, view, zlib.crc32(sample_id.encode()))

    def _entry(self, backbone, dataset: str, split: Split, transform: Callable, views: int):
        key = FeatureCache.key(backbone.identity, dataset, split, f"{transform!r}{_tower_tag(backbone)}|views={views}")
        if key not in self._entries:
            path = self.folder / f"{dataset}-views{views}-{key}.pt"
            entry: Dict[str, Dict[str, torch.Tensor]] = {}
            if path.exists():
                try:
                    entry = torch.load(path, map_location="cpu")
                except Exception:  # noqa: BLE001 - a corrupt cache file is recomputed
                    path.unlink(missing_ok=True)
            self._entries[key] = entry
            self._dirty.pop(key, None)
        return key, self._entries[key]

    @torch.no_grad()
    def ensure(self, backbone, dataset: str, split: Split, transform: Callable, views: int,
               fields: Sequence[str], indices: Sequence[int], batch_size: int, device, autocast) -> str:
        """Encode the views of the samples ``indices`` (positions in ``split``) that lack a field."""
        key, entry = self._entry(backbone, dataset, split, transform, views)
        todo = sorted({int(i) for i in indices
                       if any(f not in entry.get(split.ids[int(i)], {}) for f in fields)})
        if todo:
            items = [(i, self.view_seed(split.ids[i], v)) for i in todo for v in range(views)]
            outs = encode_items(backbone, split, transform, items, batch_size, device, autocast, fields=fields)
            cat = {f: v.unflatten(0, (len(todo), views)) for f, v in outs.items()}
            for r, i in enumerate(todo):
                e = entry.setdefault(split.ids[i], {})
                for f in fields:
                    e[f] = cat[f][r].clone()
            self._dirty[key] = self.folder / f"{dataset}-views{views}-{key}.pt"
        return key

    def lookup(self, key: str, ids: Sequence[str], view_index: Sequence[int], fields: Sequence[str],
               device) -> Dict[str, torch.Tensor]:
        """``{field: [B, ...]}``: view ``view_index[b]`` of sample ``ids[b]`` (after :meth:`ensure`)."""
        entry = self._entries[key]
        return {f: torch.stack([entry[sid][f][v] for sid, v in zip(ids, view_index)]).to(device)
                for f in fields}

    def flush(self) -> None:
        """Write the entries filled since the last flush (atomically; a crash loses only the cache)."""
        for key, path in list(self._dirty.items()):
            atomic_torch_save(path, self._entries[key])
            del self._dirty[key]
