"""The 3-D data path of the V-Net family (Table 1's LUNA16 column), built on TorchIO.

A 3-D dataset is registered with detectron2 as a list of volume records, ``{"id", "case",
"image", "mask"}`` (absolute paths of NIfTI files: ``sharp_fpn.data.medical``'s
``volume_records``; metadata ``kind="3d"``). Everything that reads, samples, augments or
normalises a volume is TorchIO's (the official UNet# code used TorchIO), none of it hand-written:

- each record is a ``tio.Subject`` of a ``tio.ScalarImage`` ("image") and a ``tio.LabelMap``
  ("mask"), so every spatial transform moves both alike and resamples the mask with nearest
  neighbours;
- normalisation (``INPUT.VOLUME.NORMALIZE``): ``tio.Clamp`` + ``tio.RescaleIntensity`` of a CT
  window, or ``tio.ZNormalization``; the same in training and at test time;
- training augmentation: ``tio.RandomFlip`` along every axis and ``tio.RandomAffine``
  (rotations, optional scaling);
- training patches: a ``tio.Queue`` over a ``tio.SubjectsDataset`` with a ``tio.LabelSampler``
  (foreground-centred patches with a given probability) or a ``tio.UniformSampler``.

:func:`build_volume_train_loader` is what ``Trainer.build_train_loader`` returns for a 3-D
config: an endless iterable of batches, each a list of ``{"image": (1, D0, D1, D2) float32,
"sem_seg": (D0, D1, D2) int64, "id"}`` (the arrays in the files' own axis order, NIfTI's
``(X, Y, Z)``). :func:`build_volume_test_loader` yields whole volumes one at a time, normalised,
with their mask as ``"sem_seg"``; :class:`VolumeIoUEvaluator` scores ``VolumeSegmentor``'s
probabilities against it: foreground IoU and Dice per volume, averaged, as
``SemanticIoUEvaluator`` does per image.

Bad input is refused before any training with a one-line error naming the file: a record
without its files, a file nibabel cannot read, a mask whose shape differs from its image's, a
volume smaller than the training patch. A mask voxel is foreground where it is above 0.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from detectron2.data import DatasetCatalog
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset

from ..metrics import foreground_dice, foreground_iou
from .config import check_value
from .evaluators import PerImageEvaluator

__all__ = [
    "CSV_COLUMNS",
    "NORMALIZATIONS",
    "SAMPLERS",
    "VolumeIoUEvaluator",
    "VolumePatchLoader",
    "VolumeTestDataset",
    "build_volume_test_loader",
    "build_volume_train_loader",
    "build_volume_transforms",
    "check_volume_records",
    "volume_subject",
]

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("window", "znorm", "")
SAMPLERS = ("label", "uniform")
#: Columns of ``volume_per_image.csv``: IoU and Dice as fractions in [0, 1].
CSV_COLUMNS = ("file_name", "image_id", "iou", "dice")
CSV_NAME = "volume_per_image.csv"


def _records(dataset_names: Sequence[str]) -> List[Dict[str, Any]]:
    records: List[Dict[str, Any]] = []
    for name in dataset_names:
        records += DatasetCatalog.get(name)
    return records


def check_volume_records(
    records: Sequence[Mapping[str, Any]], patch_size: Optional[Sequence[int]] = None,
    where: str = "",
) -> None:
    """Refuse records that cannot train, before any work: each error one line naming the file.

    Reads the NIfTI headers only (no voxel data). Checks: ``"image"`` and ``"mask"`` exist;
    the mask's shape equals the image's; every side is at least ``patch_size``'s.

    Raises:
        ValueError: an empty dataset, a record without ``image``/``mask``, a shape mismatch,
            a volume smaller than the patch.
        FileNotFoundError: a file that is not there.
    """
    if not records:
        raise ValueError(f"{where or 'dataset'}: no volumes")
    for k, record in enumerate(records):
        if "image" not in record or "mask" not in record:
            raise ValueError(f"{where} record {k} ({record.get('id', '?')}): needs 'image' and "
                             f"'mask' paths (a 3-D dataset's volume records)")
        shapes = {}
        for key in ("image", "mask"):
            path = Path(record[key])
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file (the {key} of volume "
                                        f"{record.get('id', k)!r})")
            try:
                shapes[key] = tuple(int(s) for s in nib.load(str(path)).shape[:3])
            except Exception as e:  # nibabel's ImageFileError, a truncated header...
                raise ValueError(f"{path}: not a readable NIfTI file ({e})") from None
        if shapes["mask"] != shapes["image"]:
            raise ValueError(f"{record['mask']}: mask is {'x'.join(map(str, shapes['mask']))} "
                             f"but its image {record['image']} is "
                             f"{'x'.join(map(str, shapes['image']))}")
        if patch_size is not None and any(s < p for s, p in zip(shapes["image"], patch_size)):
            raise ValueError(f"{record['image']}: volume is {'x'.join(map(str, shapes['image']))},"
                             f" smaller than INPUT.VOLUME.PATCH_SIZE "
                             f"{'x'.join(map(str, patch_size))}")


def volume_subject(record: Mapping[str, Any]) -> tio.Subject:
    """A volume record as a ``tio.Subject``: ``image`` (ScalarImage), ``mask`` (LabelMap),
    and its ``id``; nothing is read until a transform or sampler needs the voxels."""
    return tio.Subject(
        image=tio.ScalarImage(str(record["image"])),
        mask=tio.LabelMap(str(record["mask"])),
        id=str(record.get("id", Path(record["image"]).name)),
    )


def _normalisation(cfg) -> List[tio.Transform]:
    v = cfg.INPUT.VOLUME
    check_value("INPUT.VOLUME.NORMALIZE", v.NORMALIZE, v.NORMALIZE in NORMALIZATIONS,
                f"one of {NORMALIZATIONS}")
    if v.NORMALIZE == "window":
        check_value("INPUT.VOLUME.WINDOW", v.WINDOW,
                    len(v.WINDOW) == 2 and v.WINDOW[0] < v.WINDOW[1], "[low, high], low < high")
        low, high = (float(w) for w in v.WINDOW)
        return [tio.Clamp(low, high, include=["image"]),
                tio.RescaleIntensity((0.0, 1.0), in_min_max=(low, high), include=["image"])]
    if v.NORMALIZE == "znorm":
        return [tio.ZNormalization(include=["image"])]
    return []


def build_volume_transforms(cfg, is_train: bool) -> tio.Compose:
    """``INPUT.VOLUME.*`` as one ``tio.Compose``: the normalisation, then (training only) the
    flips and the random affine. Applied to a subject's image and mask alike (the intensity
    transforms to the image only)."""
    v = cfg.INPUT.VOLUME
    transforms = _normalisation(cfg)
    if is_train:
        if v.FLIP:
            transforms.append(tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5))
        check_value("INPUT.VOLUME.ROTATION", v.ROTATION, v.ROTATION >= 0, ">= 0 degrees")
        check_value("INPUT.VOLUME.SCALE", v.SCALE, 0 <= v.SCALE < 1, "in [0, 1)")
        if v.ROTATION > 0 or v.SCALE > 0:
            check_value("INPUT.VOLUME.AFFINE_PROBABILITY", v.AFFINE_PROBABILITY,
                        0 <= v.AFFINE_PROBABILITY <= 1, "in [0, 1]")
            transforms.append(tio.RandomAffine(
                scales=float(v.SCALE), degrees=float(v.ROTATION), isotropic=True,
                image_interpolation="linear", p=float(v.AFFINE_PROBABILITY)))
    return tio.Compose(transforms)


def _patch_size(cfg) -> Tuple[int, int, int]:
    size = cfg.INPUT.VOLUME.PATCH_SIZE
    check_value("INPUT.VOLUME.PATCH_SIZE", size, len(size) == 3 and min(size) > 0,
                "[s0, s1, s2], three positive sides")
    return tuple(int(s) for s in size)


def _sampler(cfg, patch_size: Tuple[int, int, int]) -> tio.data.PatchSampler:
    v = cfg.INPUT.VOLUME
    check_value("INPUT.VOLUME.SAMPLER", v.SAMPLER, v.SAMPLER in SAMPLERS, f"one of {SAMPLERS}")
    if v.SAMPLER == "uniform":
        return tio.UniformSampler(patch_size)
    p = float(v.FOREGROUND_PROBABILITY)
    check_value("INPUT.VOLUME.FOREGROUND_PROBABILITY", p, 0 <= p <= 1, "in [0, 1]")
    return tio.LabelSampler(patch_size, label_name="mask", label_probabilities={0: 1 - p, 1: p})


def _batch_dicts(batch: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """A collated TorchIO batch -> the list of model inputs detectron2's trainer hands on."""
    images = batch["image"][tio.DATA].float()
    masks = batch["mask"][tio.DATA]
    return [
        {"image": images[k], "sem_seg": (masks[k, 0] > 0).long(), "id": batch["id"][k]}
        for k in range(images.shape[0])
    ]


class VolumePatchLoader:
    """An endless iterable of training batches of patches (detectron2's trainer draws
    ``next(iter(loader))`` every step, forever), over a ``tio.Queue``.

    Every pass over the queue is one pass over the (shuffled) volumes; the next pass starts
    where it ends. A pass's last, incomplete batch is dropped: a batch of one patch would
    fail the CGMs' BatchNorm1d in training.
    """

    def __init__(self, queue: tio.Queue, batch_size: int):
        self.queue = queue
        self.batch_size = batch_size
        # TorchIO's rule: the queue's own workers load volumes; this loader has none
        self.loader = DataLoader(queue, batch_size=batch_size, num_workers=0, drop_last=True)

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        while True:
            for batch in self.loader:
                yield _batch_dicts(batch)


def build_volume_train_loader(cfg) -> VolumePatchLoader:
    """The training loader of a 3-D config: ``DATASETS.TRAIN``'s volumes, checked
    (:func:`check_volume_records`), through :func:`build_volume_transforms` into a
    ``tio.Queue`` of ``INPUT.VOLUME.PATCH_SIZE`` patches; batches of
    ``SOLVER.IMS_PER_BATCH / world size`` patches per process, each process loading its own
    share of the volumes (``DistributedSampler``) with ``DATALOADER.NUM_WORKERS`` workers."""
    patch_size = _patch_size(cfg)
    records = _records(cfg.DATASETS.TRAIN)
    check_volume_records(records, patch_size, where=f"DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}")
    transform = build_volume_transforms(cfg, True)
    subjects = tio.SubjectsDataset([volume_subject(r) for r in records], transform=transform)
    v = cfg.INPUT.VOLUME
    world = comm.get_world_size()
    subject_sampler = None
    if world > 1:
        subject_sampler = torch.utils.data.DistributedSampler(
            subjects, num_replicas=world, rank=comm.get_rank(), shuffle=True,
            seed=max(cfg.SEED, 0))
    queue = tio.Queue(
        subjects,
        max_length=int(v.QUEUE_LENGTH),
        samples_per_volume=int(v.SAMPLES_PER_VOLUME),
        sampler=_sampler(cfg, patch_size),
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        shuffle_subjects=subject_sampler is None,
        shuffle_patches=True,
        subject_sampler=subject_sampler,
        verbose=False,
    )
    batch_size = cfg.SOLVER.IMS_PER_BATCH // max(world, 1)
    patches = len(records) // max(world, 1) * int(v.SAMPLES_PER_VOLUME)
    if patches < batch_size:
        raise ValueError(
            f"DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}: {len(records)} volumes x "
            f"INPUT.VOLUME.SAMPLES_PER_VOLUME {v.SAMPLES_PER_VOLUME} give {patches} patches a "
            f"pass per process, fewer than a batch of {batch_size} (SOLVER.IMS_PER_BATCH / "
            f"processes)")
    logger.info(f"3-D training data: {len(records)} volumes, {tuple(patch_size)} patches, "
                f"{v.SAMPLES_PER_VOLUME} per volume, transforms {transform}")
    return VolumePatchLoader(queue, batch_size)


class VolumeTestDataset(Dataset):
    """Whole volumes for evaluation: ``{"image": (1, D0, D1, D2) float32 (normalised as in
    training), "sem_seg": (D0, D1, D2) int64 (the mask), "id", "file_name", "image_id"}``."""

    def __init__(self, records: Sequence[Mapping[str, Any]], transform: tio.Transform):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        record = self.records[index]
        subject = self.transform(volume_subject(record))
        item = _batch_dicts({"image": {tio.DATA: subject["image"][tio.DATA][None]},
                             "mask": {tio.DATA: subject["mask"][tio.DATA][None]},
                             "id": [subject["id"]]})[0]
        item.update(file_name=str(record["image"]), image_id=subject["id"])
        return item


def _as_list(batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return batch


def build_volume_test_loader(cfg, dataset_name: str) -> DataLoader:
    """One whole volume per batch, as detectron2's ``inference_on_dataset`` reads them (a list
    of input dicts; ``len()`` the number of volumes), this process's share when distributed."""
    records = _records([dataset_name])
    check_volume_records(records, where=f"DATASETS.TEST {dataset_name!r}")
    world, rank = comm.get_world_size(), comm.get_rank()
    dataset = VolumeTestDataset(records[rank::world], build_volume_transforms(cfg, False))
    return DataLoader(dataset, batch_size=1, num_workers=int(cfg.DATALOADER.NUM_WORKERS),
                      collate_fn=_as_list)


class VolumeIoUEvaluator(PerImageEvaluator):
    """Per-volume foreground IoU and Dice of ``output["sem_seg"] > threshold`` against the
    input's mask (``"sem_seg"``, as :class:`VolumeTestDataset` gives it), averaged over volumes.

    The prediction is ``(1, D0, D1, D2)`` foreground probabilities of the whole volume
    (``VolumeSegmentor``'s output). ``evaluate()`` returns ``{"semantic": {"IoU", "Dice",
    "num_images"}}`` (means in percent, the keys of ``SemanticIoUEvaluator`` so that tables
    read both alike; ``num_images`` counts volumes) and, with an ``output_dir``, writes
    ``volume_per_image.csv``. A volume where truth and prediction are both empty scores 100
    (``foreground_iou``'s convention).
    """

    csv_name = CSV_NAME
    csv_columns = CSV_COLUMNS

    def __init__(self, dataset_name: str, threshold: float = 0.5,
                 output_dir: Optional[str] = None, distributed: bool = True) -> None:
        """
        Args:
            dataset_name: the registered 3-D dataset (names the results).
            threshold: a voxel is foreground where its probability is above it.
            output_dir: where ``evaluate()`` writes the per-volume CSV.
            distributed: gather the records of every process; only the main one returns.
        """
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        super().__init__(dataset_name, distributed, output_dir)
        self._threshold = float(threshold)

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        """Score a batch of volumes: ``inputs`` hold ``"sem_seg"``, ``outputs`` ``"sem_seg"``."""
        for record, output in zip(inputs, outputs):
            where = str(record.get("file_name", record.get("id", "?")))
            if "sem_seg" not in record:
                raise ValueError(f"{where}: input has no 'sem_seg' (the volume's mask); use "
                                 "build_volume_test_loader")
            truth = record["sem_seg"].cpu().numpy() > 0
            probabilities = output["sem_seg"]
            if tuple(probabilities.shape) != (1, *truth.shape):
                raise ValueError(f"{where}: sem_seg has shape {tuple(probabilities.shape)}, "
                                 f"expected (1, {', '.join(map(str, truth.shape))})")
            prediction = (probabilities[0] > self._threshold).cpu().numpy()
            self._records.append({
                "file_name": where,
                "image_id": record.get("image_id", record.get("id", "")),
                "iou": foreground_iou(truth, prediction),
                "dice": foreground_dice(truth, prediction),
            })

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Means over every volume (of every process), in percent; ``{}`` off the main process
        or when nothing was processed."""
        records = self._gathered_records()
        if records is None:
            return {}
        result = {
            "IoU": 100.0 * float(np.mean([r["iou"] for r in records])),
            "Dice": 100.0 * float(np.mean([r["dice"] for r in records])),
            "num_images": len(records),
        }
        logger.info(f"[VolumeIoUEvaluator] {self._dataset_name}: foreground IoU "
                    f"{result['IoU']:.2f}%, Dice {result['Dice']:.2f}% over {len(records)} "
                    f"volumes (threshold {self._threshold})")
        return {"semantic": result}
