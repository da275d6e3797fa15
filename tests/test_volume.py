"""The 3-D training path (sharp_fpn.d2.volume, sharp_fpn.d2.volume_data): VolumeSegmentor through
detectron2's Trainer on tiny NIfTI volumes written by nibabel, TorchIO's augmentation moving
image and mask alike, the per-volume evaluator on known predictions, bad volumes refused.

The volumes are 16^3 (one 16^3 patch each), the networks the V-Net family at 1/8 width.
"""
from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from sharp_fpn.d2.engine import Trainer, get_config
from sharp_fpn.d2.volume import VolumeSegmentor, pad_volumes
from sharp_fpn.d2.volume_data import (
    VolumeIoUEvaluator,
    build_volume_test_loader,
    build_volume_transforms,
    check_volume_records,
    volume_subject,
)
from sharp_fpn.models import GridUNet

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "semantic" / "table1" / "luna16" / "vnet_sharp_ds.yaml")
TINY3D = "volume_test_tiny3d"
#: a non-trivial affine: anisotropic spacing, axes flipped and an offset, as scanners write
AFFINE = np.array([[-0.7, 0, 0, 90.0], [0, 0.7, 0, -120.0], [0, 0, 1.25, -300.0], [0, 0, 0, 1]])


def _write_volume(folder: Path, name: str, rng: np.random.Generator, shape=(16, 16, 16),
                  nodule: bool = True) -> dict:
    """A CT-like volume in HU (lung ~ -800, a bright nodule ~ 40) and its 0/1 mask, NIfTI."""
    image = rng.normal(-800.0, 40.0, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    if nodule:
        c = rng.integers(4, np.array(shape) - 4)
        z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
        mask[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= 9] = 1
        image[mask > 0] = rng.normal(40.0, 20.0, int(mask.sum()))
    paths = {k: folder / f"{name}_{k}.nii.gz" for k in ("image", "mask")}
    nib.save(nib.Nifti1Image(image, AFFINE), str(paths["image"]))
    nib.save(nib.Nifti1Image(mask, AFFINE), str(paths["mask"]))
    return {"id": name, "case": name, "image": str(paths["image"]), "mask": str(paths["mask"])}


@pytest.fixture(scope="module")
def tiny3d(tmp_path_factory):
    """Three 16^3 volumes (two with a nodule, one without) registered as a 3-D dataset."""
    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    records = [_write_volume(folder, f"vol{k}", rng, nodule=k < 2) for k in range(3)]
    DatasetCatalog.register(TINY3D, lambda: records)
    MetadataCatalog.get(TINY3D).set(kind="3d")
    yield records
    DatasetCatalog.remove(TINY3D)
    MetadataCatalog.remove(TINY3D)


def _config(tmp_path, *opts):
    cfg = get_config(CONFIG, [
        "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", f"('{TINY3D}',)", "DATASETS.TEST",
        f"('{TINY3D}',)", "MODEL.UNET.WIDTH_MULT", 0.125, "INPUT.VOLUME.PATCH_SIZE",
        [16, 16, 16], "INPUT.VOLUME.SAMPLES_PER_VOLUME", 2, "INPUT.VOLUME.QUEUE_LENGTH", 4,
        "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "SOLVER.CHECKPOINT_PERIOD",
        1000, "OUTPUT_DIR", str(tmp_path), *opts])
    cfg.freeze()
    return cfg


def test_training_steps_through_the_trainer(tiny3d, tmp_path):
    cfg = _config(tmp_path, "SOLVER.MAX_ITER", 2, "MODEL.UNET.CGM", True)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    assert isinstance(model, VolumeSegmentor) and model.network.dims == 3
    assert len(model.network.branches) == 8  # V-Net#'s deep supervision: all 8 branches
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 2 and all(np.isfinite(v) for v, _ in losses)
    assert trainer.storage.history("loss_cgm").latest() > 0  # the CGMs were trained too
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed > 0.9 * len(before)

    results = Trainer.test(cfg, model)["semantic"]
    assert results["num_images"] == 3 and 0 <= results["IoU"] <= 100
    with open(tmp_path / "inference" / TINY3D / "volume_per_image.csv", newline="") as f:
        assert sorted(r["image_id"] for r in csv.DictReader(f)) == ["vol0", "vol1", "vol2"]


def test_the_train_loader_gives_patches_of_image_and_mask(tiny3d, tmp_path):
    cfg = _config(tmp_path)
    batch = next(iter(Trainer.build_train_loader(cfg)))
    assert len(batch) == 2
    for item in batch:
        assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
        assert item["sem_seg"].shape == (16, 16, 16) and item["sem_seg"].dtype == torch.int64
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0  # window
        assert set(item["sem_seg"].unique().tolist()) <= {0, 1}


def test_too_few_patches_for_a_batch_is_refused(tiny3d, tmp_path):
    cfg = _config(tmp_path, "SOLVER.IMS_PER_BATCH", 8)
    with pytest.raises(ValueError, match=r"3 volumes x INPUT.VOLUME.SAMPLES_PER_VOLUME 2 give 6 "
                                         r"patches a pass per process, fewer than a batch of 8"):
        Trainer.build_train_loader(cfg)


def test_flips_move_image_and_mask_alike(tiny3d, tmp_path):
    """On a volume whose mask is exactly its thresholded image, every TorchIO flip keeps it so;
    a rotation (linear image, nearest mask) keeps it up to the interpolated border."""
    cfg = _config(tmp_path, "INPUT.VOLUME.NORMALIZE", "", "INPUT.VOLUME.ROTATION", 0.0)
    rng = np.random.default_rng(1)
    image = np.zeros((16, 16, 16), np.float32)
    image[2:9, 3:6, 10:15] = 1.0  # an asymmetric block: any flip moves it
    image[11:14, 9:15, 1:4] = 1.0
    image += rng.uniform(-0.2, 0.2, image.shape).astype(np.float32)
    paths = {k: tmp_path / f"flip_{k}.nii.gz" for k in ("image", "mask")}
    nib.save(nib.Nifti1Image(image, AFFINE), str(paths["image"]))
    nib.save(nib.Nifti1Image((image > 0.5).astype(np.uint8), AFFINE), str(paths["mask"]))
    record = {"id": "flip", "image": str(paths["image"]), "mask": str(paths["mask"])}

    torch.manual_seed(0)
    flips = build_volume_transforms(cfg, is_train=True)
    moved = 0
    for _ in range(6):
        subject = flips(volume_subject(record))
        out_image = subject["image"].data[0].numpy()
        out_mask = subject["mask"].data[0].numpy()
        np.testing.assert_array_equal(out_mask, (out_image > 0.5).astype(out_mask.dtype))
        moved += not np.array_equal(out_image, image)
    assert moved >= 4  # P(no flip on 3 axes) = 1/8 per draw

    rotate = build_volume_transforms(_config(
        tmp_path, "INPUT.VOLUME.NORMALIZE", "", "INPUT.VOLUME.FLIP", False,
        "INPUT.VOLUME.ROTATION", 20.0, "INPUT.VOLUME.AFFINE_PROBABILITY", 1.0), is_train=True)
    subject = rotate(volume_subject(record))
    out_image = subject["image"].data[0].numpy()
    out_mask = subject["mask"].data[0].numpy()
    assert not np.array_equal(out_image, image)
    assert set(np.unique(out_mask).tolist()) <= {0, 1}  # nearest neighbour: still a label map
    agree = np.logical_and(out_mask > 0, out_image > 0.5).sum() / np.logical_or(
        out_mask > 0, out_image > 0.5).sum()
    assert agree > 0.8


def test_evaluator_on_known_predictions(tmp_path):
    truth = torch.zeros(8, 8, 8, dtype=torch.int64)
    truth[0:4, 0:4, 0:4] = 1  # 64 voxels
    prediction = torch.zeros(1, 8, 8, 8)
    prediction[0, 2:6, 0:4, 0:4] = 0.9  # 64 voxels, 32 of them on the truth
    evaluator = VolumeIoUEvaluator("known", output_dir=str(tmp_path), distributed=False)
    evaluator.reset()
    evaluator.process(
        [{"sem_seg": truth, "file_name": "a.nii.gz", "image_id": "a"},
         {"sem_seg": torch.zeros(8, 8, 8, dtype=torch.int64), "file_name": "b.nii.gz",
          "image_id": "b"}],
        [{"sem_seg": prediction}, {"sem_seg": torch.full((1, 8, 8, 8), 0.2)}])
    result = evaluator.evaluate()["semantic"]
    # a: IoU 32 / 96, Dice 64 / 128; b: nothing true, nothing above 0.5: both 100 %
    assert result["IoU"] == pytest.approx((100 / 3 + 100) / 2)
    assert result["Dice"] == pytest.approx((50 + 100) / 2)
    assert result["num_images"] == 2
    with open(tmp_path / "volume_per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["iou"]) for r in rows] == pytest.approx([1 / 3, 1.0])
    with pytest.raises(ValueError, match=r"c.nii.gz: sem_seg has shape \(1, 8, 8, 4\)"):
        evaluator.process([{"sem_seg": truth, "file_name": "c.nii.gz"}],
                          [{"sem_seg": torch.zeros(1, 8, 8, 4)}])


def test_bad_volumes_are_refused_naming_the_file(tmp_path):
    rng = np.random.default_rng(2)
    good = _write_volume(tmp_path, "good", rng)
    small = _write_volume(tmp_path, "small", rng, shape=(16, 12, 16))
    with pytest.raises(ValueError, match=r"small_image.nii.gz: volume is 16x12x16, smaller "
                                         r"than INPUT.VOLUME.PATCH_SIZE 16x16x16"):
        check_volume_records([good, small], (16, 16, 16))
    mismatched = dict(good, mask=small["mask"])
    with pytest.raises(ValueError, match=r"small_mask.nii.gz: mask is 16x12x16 but its image "
                                         r".*good_image.nii.gz is 16x16x16"):
        check_volume_records([mismatched])
    with pytest.raises(FileNotFoundError, match=r"gone.nii.gz: no such file"):
        check_volume_records([dict(good, image=str(tmp_path / "gone.nii.gz"))])
    broken = tmp_path / "broken_image.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match=r"broken_image.nii.gz: not a readable NIfTI"):
        check_volume_records([dict(good, image=str(broken))])


def test_inference_whole_volume_patches_and_pruning(tiny3d, tmp_path):
    torch.manual_seed(0)
    network = GridUNet("sharp", 1, 1, (2, 4, 8, 16), dims=3, kernel_size=3,
                       deep_supervision="all").eval()
    whole = VolumeSegmentor(network=network).eval()
    volume = torch.randn(1, 20, 24, 12)  # sides no multiple of the stride 8: padded, cropped
    with torch.no_grad():
        p = whole([{"image": volume}])[0]["sem_seg"]
        assert p.shape == (1, 20, 24, 12) and 0 <= float(p.min()) and float(p.max()) <= 1
        patched = VolumeSegmentor(network=network, test_patch_size=(16, 16, 16),
                                  test_patch_overlap=(4, 4, 4)).eval()
        q = patched([{"image": volume}])[0]["sem_seg"]
        assert q.shape == p.shape and 0 <= float(q.min()) and float(q.max()) <= 1
        pruned = VolumeSegmentor(network=network, prune_level=2).eval()
        batch, _ = pad_volumes([volume], network.size_divisibility)
        expected = network.prune(2).predict_probabilities(batch)[0, :, :20, :24, :12]
        torch.testing.assert_close(pruned([{"image": volume}])[0]["sem_seg"], expected)
    with pytest.raises(ValueError, match=r"TEST.VOLUME.PATCH_SIZE: expected three sides, "
                                         r"multiples of 8"):
        VolumeSegmentor(network=network, test_patch_size=(12, 16, 16))

    loader = build_volume_test_loader(_config(tmp_path), TINY3D)
    items = [batch[0] for batch in loader]
    assert len(loader) == 3 and [x["image_id"] for x in items] == ["vol0", "vol1", "vol2"]
    assert items[2]["sem_seg"].sum() == 0 and items[0]["sem_seg"].sum() > 0


def test_pad_volumes():
    a, b = torch.ones(1, 5, 6, 7), torch.ones(1, 9, 3, 8)
    batch, sizes = pad_volumes([a, b], 4)
    assert batch.shape == (2, 1, 12, 8, 8) and sizes == [(5, 6, 7), (9, 3, 8)]
    assert batch[0].sum() == a.sum() and batch[1, :, :9, :3, :8].sum() == b.sum()
