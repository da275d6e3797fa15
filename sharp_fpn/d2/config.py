"""sharp-fpn's config keys, added to a detectron2 config by :func:`add_sharp_fpn_config`.

Every key is listed here with what it does and its default; a key in a yaml file that is not
defined here or by detectron2 fails at merge time, naming the key.
"""
from typing import Any

from detectron2.config import CfgNode as CN


def add_sharp_fpn_config(cfg: CN) -> CN:
    """Add sharp-fpn's keys (with their defaults) to ``cfg`` in place; return it."""
    _C = cfg

    # ---------------------------------------------------------------------------------------
    # The grid necks: FPN with UNet++ / UNet3+ / UNet# skips (Table 2's lower half, SPEC 3)
    # built by build_{resnet,vgg16}_grid_fpn_backbone. They read MODEL.FPN.IN_FEATURES (C2..C5,
    # strides 4..32, finest first) and MODEL.FPN.OUT_CHANNELS (the channels of p2..p6).
    # ---------------------------------------------------------------------------------------
    # res2..res5 widths of a basic-block ResNet (MODEL.RESNETS.DEPTH 18 or 34) built from
    # detectron2's parts by sharp_fpn.d2.resnet: [] (default) is detectron2's ResNet, unchanged.
    _C.MODEL.RESNETS.STAGE_WIDTHS = []

    _C.MODEL.SHARP_FPN = CN()
    # Which node feeds which (sharp_fpn.grid): "2plus" (UNet++), "3plus" (UNet3+), "sharp"
    # (UNet#), or "unet" (the anti-diagonal alone: FPN with concatenation and conv nodes).
    _C.MODEL.SHARP_FPN.SCHEME = "sharp"
    # Op of each decoder node on its concatenated inputs: "f2" (two conv3x3-norm-ReLU, the
    # paper's) or "f" (one). UNet3+ nodes always project each input with its own "f" first.
    _C.MODEL.SHARP_FPN.NODE_OP = "f2"
    # Norm of the laterals, the nodes and the output convs: "" (none; convs get biases),
    # "GN" (GroupNorm, gcd(32, C) groups so any width works), "BN", "SyncBN", "FrozenBN",
    # "nnSyncBN" or "naiveSyncBN" (detectron2's). GN: batch statistics of 2 images a GPU are
    # too noisy for BN.
    _C.MODEL.SHARP_FPN.NORM = "GN"
    # UNet#'s full-scale op F: "upsample" (the official code's live version: upsampling only)
    # or "conv" (its commented-out version: upsampling, then a conv3x3 per source to
    # WIDTHS[0] channels, one shared norm, ReLU).
    _C.MODEL.SHARP_FPN.FULL_SCALE = "upsample"
    # Channels of the grid's nodes at levels 0..3 (strides 4..32): the laterals (column 0)
    # and the decoder nodes of each level. One entry per MODEL.FPN.IN_FEATURES. The outputs
    # p2..p5 are then projected to MODEL.FPN.OUT_CHANNELS. UNet3+ projects each input of a
    # node to WIDTHS[0] channels (its CatChannels). Widths decide the cost, level 0's most
    # (~w0^2): with these, a UNet# neck on R101 at 512x512 costs ~2.2x detectron2's FPN on
    # CPU (29 vs 15 GMACs), a whole Mask R-CNN ~1.1-1.2x the plain FPN's.
    _C.MODEL.SHARP_FPN.WIDTHS = [96, 128, 256, 256]
    # Interpolation of every upsampling in the grid: "nearest" (detectron2's FPN),
    # "bilinear" (the official UNet code, align_corners=True), "bicubic", "nearest-exact".
    _C.MODEL.SHARP_FPN.UPSAMPLE = "nearest"
    # Bring every upsampled input that is wider than its node to the node's width with a
    # bias-free 1x1 conv at its own, coarser resolution before upsampling (the same as
    # doing it after: a 1x1 conv commutes with interpolation), so deep, wide maps do not
    # enter the fine levels' 3x3 convs at full width. False: the paper's grid as it is.
    _C.MODEL.SHARP_FPN.REDUCE_UPSAMPLED = True

    # ---------------------------------------------------------------------------------------
    # VGG bottom-up (build_vgg_backbone and the vgg16 necks), torchvision's layout
    # ---------------------------------------------------------------------------------------
    _C.MODEL.VGG = CN()
    # 11, 13, 16 or 19 conv/fc layers (torchvision's vgg11..vgg19).
    _C.MODEL.VGG.DEPTH = 16
    # "" : torchvision's vgg16 (conv-ReLU). A detectron2 norm name ("BN", "FrozenBN",
    # "SyncBN", "GN") puts it after every conv: torchvision's vgg16_bn layout.
    _C.MODEL.VGG.NORM = ""
    # Stages to return, named by the pool that ends them: pool1..pool5, strides 2..32,
    # channels 64, 128, 256, 512, 512. The necks use pool2..pool5 as C2..C5.
    _C.MODEL.VGG.OUT_FEATURES = ["pool2", "pool3", "pool4", "pool5"]

    # ---------------------------------------------------------------------------------------
    # Evaluation of instance models (Table 2's lower half and the DSB2018 challenge metric)
    # ---------------------------------------------------------------------------------------
    _C.TEST.DSB = CN()
    # Predicted instances scoring below this are dropped before the DSB score and the
    # foreground IoU/Dice are computed (COCO AP always uses every detection).
    _C.TEST.DSB.SCORE_THRESHOLD = 0.5

    add_unet_config(cfg)
    return cfg


def add_unet_config(cfg: CN) -> CN:
    """Add the keys of the semantic models (``SemanticNucleiSegmentor``, Table 1 and Table 2's
    upper half) and of the solver choice to ``cfg`` in place; return it."""
    _C = cfg

    # ---------------------------------------------------------------------------------------
    # Semantic nuclei segmentation (sharp_fpn.d2.semantic), META_ARCHITECTURE
    # "SemanticNucleiSegmentor". Ground truth: the union of each image's nucleus masks.
    # ---------------------------------------------------------------------------------------
    _C.MODEL.UNET = CN()
    # False: the paper's VGG-block networks of Table 1 (ARCH, WIDTH_MULT). True: the bottom-up
    # named by MODEL.BACKBONE.NAME (build_resnet_backbone, build_vgg_backbone) with a grid
    # decoder on its IN_FEATURES (DECODER, WIDTHS, UPSAMPLE_WIDTHS): Table 2's upper half.
    _C.MODEL.UNET.USE_BACKBONE = False
    # Table 1 network: "unet", "wunet", "unet2plus", "unet3plus" or "unet_sharp" (2-D,
    # SemanticNucleiSegmentor); "vnet", "wvnet", "vnet2plus", "vnet3plus" or "vnet_sharp" (the
    # 3-D V-Net family, VolumeSegmentor; 5x5x5 nodes, one input channel).
    _C.MODEL.UNET.ARCH = "unet_sharp"
    # Table 1 networks: multiplies the arch's widths (UNet [32..512], WUNet [35..560]), rounded;
    # 1.0 gives the paper's networks, exactly create_model(ARCH); smaller for smoke runs.
    _C.MODEL.UNET.WIDTH_MULT = 1.0
    # Backbone networks: which node feeds which in the decoder: "unet", "2plus", "3plus" or
    # "sharp" (sharp_fpn.grid).
    _C.MODEL.UNET.DECODER = "sharp"
    # Backbone networks: the bottom-up's maps forming the grid's column 0, finest first,
    # strides doubling (ResNet: res2..res5; VGG: pool2..pool5, strides 4..32).
    _C.MODEL.UNET.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Backbone networks: channels of the decoder nodes of each level but the coarsest (one per
    # IN_FEATURES entry minus one, finest first). UNet3+ projects its inputs to WIDTHS[0].
    _C.MODEL.UNET.WIDTHS = [64, 128, 256]
    # Backbone networks: widths of the conv blocks that take the final node (and, with deep
    # supervision "top" or "all", each top-row node) from the stride of IN_FEATURES[0] to full
    # resolution, one per doubling (stride 4: two).
    _C.MODEL.UNET.UPSAMPLE_WIDTHS = [32, 16]
    # Backbone networks: 1x1-reduce upsampled inputs wider than their node at their own
    # resolution (GridDecoder's reduce_upsampled); False feeds them to the 3x3 convs whole.
    _C.MODEL.UNET.REDUCE_UPSAMPLED = True
    # Norm of the VGG blocks, decoder nodes and heads: "BN" (the paper's), "GN" or "".
    _C.MODEL.UNET.NORM = "BN"
    # Interpolation of the grid's upsamplings: "bilinear" (official, align_corners=True),
    # "bicubic", "nearest" or "nearest-exact".
    _C.MODEL.UNET.UPSAMPLE = "bilinear"
    # UNet#'s full-scale op F: "upsample" (official code, default) or "conv" (its commented-out
    # version; the paper's 9.71M parameters). Only UNet# has full-scale skips.
    _C.MODEL.UNET.FULL_SCALE = "upsample"
    # Deep supervision: a head on every supervised branch, the mixed loss averaged over them
    # (the paper's accurate mode). False: one head, on the final node.
    _C.MODEL.UNET.DEEP_SUPERVISION = False
    # Which branches deep supervision adds: "" = the scheme's own (UNet, UNet3+: "decoder";
    # UNet++: "top"; UNet#: "all"), or "top" (X[0][1..L-1], needed for pruning), "decoder"
    # (X[L][0]..X[1][L-1]) or "all".
    _C.MODEL.UNET.DS_BRANCHES = ""
    # Ground truth of a coarse branch: "pool" (max-pooled down to it, the paper's) or
    # "upsample" (its logits upsampled to full size, the official code's).
    _C.MODEL.UNET.DS_TARGET = "pool"
    # Weights of focal (alpha 0.25, gamma 2), soft Dice and Lovasz hinge in the mixed loss.
    _C.MODEL.UNET.LOSS_WEIGHTS = [0.5, 1.0, 0.5]
    # Classification-guided modules on every branch: trained to tell whether an image holds
    # any nucleus; at inference their 0/1 decision multiplies the prediction.
    _C.MODEL.UNET.CGM = False
    # Dropout probability inside the CGMs.
    _C.MODEL.UNET.CGM_DROPOUT = 0.5
    # Weight of the CGM loss (cross-entropy) beside the segmentation loss.
    _C.MODEL.UNET.CGM_LOSS_WEIGHT = 1.0
    # Inference with the sub-network ending at X[0][k] (the paper's fast mode), k = 1..L; 0 =
    # the whole network. Any network with a head there (a nested scheme, DEEP_SUPERVISION with
    # DS_BRANCHES "top" or "all"), VGG blocks or backbone.
    _C.MODEL.UNET.PRUNE_LEVEL = 0

    # Pre-processing of the semantic models (SemanticNucleiMapper), the paper's.
    _C.INPUT.SEMANTIC = CN()
    # Every image is resized to this [height, width] (pytorch-nested-unet: 96x96); [] keeps
    # each image's size. Predictions are resized back to the original size.
    _C.INPUT.SEMANTIC.SIZE = [96, 96]
    # Training: rotate by a random multiple of 90 degrees.
    _C.INPUT.SEMANTIC.ROTATE90 = True
    # Training: flip horizontally and vertically, each with probability 1/2.
    _C.INPUT.SEMANTIC.FLIP = True
    # Training: one of an HSV shift (hue +-20, saturation +-30, value +-20), a brightness or a
    # contrast change (factor 0.8..1.2), chosen uniformly per image.
    _C.INPUT.SEMANTIC.COLOR_JITTER = True

    # ---------------------------------------------------------------------------------------
    # The recipe of the shipped nuclei models (configs/zoo/, sharp_fpn.model_zoo): what training
    # and prediction both do to an image, so that a model sees the same kind of input in both.
    # ---------------------------------------------------------------------------------------
    # Per-image intensity normalisation before the model, in training (NucleiDatasetMapper,
    # after the augmentations) and prediction (NucleiPredictor, on the whole image before it is
    # tiled): "" (off: the image as read, sharp_fpn.predict.image_io) or "percentile" (the
    # INPUT.NORMALIZE_PERCENTILES of the image, all channels together, mapped to 0 and 255,
    # the range never narrower than image_io.MIN_SPAN_NOISE noise standard deviations).
    _C.INPUT.NORMALIZE = ""
    _C.INPUT.NORMALIZE_PERCENTILES = [1.0, 99.8]
    # Training: rescale each image by a factor log-uniform in [low, high] of its own size
    # instead of ResizeShortestEdge, then INPUT.CROP, then INPUT.DIHEDRAL (sharp_fpn.d2.augment).
    # [] (default): detectron2's resize and INPUT.RANDOM_FLIP.
    _C.INPUT.RESCALE_RANGE = []
    # Training, with RESCALE_RANGE: flips both ways and a transpose, each with probability 1/2
    # (the 8 rotations and reflections of the square); False: INPUT.RANDOM_FLIP.
    _C.INPUT.DIHEDRAL = False
    # Training: torchvision's colour jitter, gamma, grayscale, blur and noise and
    # scikit-image's stain jitter (sharp_fpn.data.augment, its table), before INPUT.NORMALIZE.
    _C.INPUT.PHOTOMETRIC = False
    # Median nucleus diameter (px) of the images the model was trained on, after the training
    # augmentations' mean scale; tools/predict.py --diameter rescales an image so that its
    # nuclei have this size. 0: not known (--diameter is then refused).
    _C.INPUT.NUCLEUS_DIAMETER = 0.0

    # Pre-processing of the 3-D models (VolumeSegmentor, the V-Net family on LUNA16), built
    # on TorchIO by sharp_fpn.d2.volume_data: patches drawn by a tio.Queue, tio.RandomFlip and
    # tio.RandomAffine for augmentation, TorchIO's intensity transforms for normalisation.
    _C.INPUT.VOLUME = CN()
    # Training patches, [side0, side1, side2] voxels in the arrays' order (NIfTI's (X, Y, Z));
    # each side a multiple of the network's coarsest stride (16 for the 5-level V-Nets).
    _C.INPUT.VOLUME.PATCH_SIZE = [64, 64, 64]
    # Patch sampler: "label" (tio.LabelSampler: a patch centred on foreground with probability
    # FOREGROUND_PROBABILITY, else on background) or "uniform" (tio.UniformSampler).
    _C.INPUT.VOLUME.SAMPLER = "label"
    _C.INPUT.VOLUME.FOREGROUND_PROBABILITY = 0.5
    # tio.Queue: patches drawn from each loaded volume, and the most patches it holds.
    _C.INPUT.VOLUME.SAMPLES_PER_VOLUME = 4
    _C.INPUT.VOLUME.QUEUE_LENGTH = 64
    # Intensity normalisation of every volume, training and test alike: "window" (tio.Clamp
    # to WINDOW, then tio.RescaleIntensity of WINDOW to [0, 1]: a CT window in HU), "znorm"
    # (tio.ZNormalization: zero mean, unit std per volume) or "" (values as stored).
    _C.INPUT.VOLUME.NORMALIZE = "window"
    # The intensity window of NORMALIZE "window" (LUNA16: lung window -1000..400 HU).
    _C.INPUT.VOLUME.WINDOW = [-1000.0, 400.0]
    # Training: tio.RandomFlip along every axis, each with probability 1/2.
    _C.INPUT.VOLUME.FLIP = True
    # Training: tio.RandomAffine rotations, uniform in +-ROTATION degrees about each axis (0:
    # none), and scaling by a factor in [1 - SCALE, 1 + SCALE] (0: none); linear
    # interpolation of the image, nearest of the mask (TorchIO's rule for a LabelMap).
    _C.INPUT.VOLUME.ROTATION = 10.0
    _C.INPUT.VOLUME.SCALE = 0.0
    # Probability of applying the affine (1: every patch's volume).
    _C.INPUT.VOLUME.AFFINE_PROBABILITY = 0.5

    _C.TEST.VOLUME = CN()
    # Inference on whole volumes ([]) or, for volumes larger than memory allows, patches of
    # this size (tio.GridSampler) with TEST.VOLUME.PATCH_OVERLAP voxels of overlap, averaged
    # back together (tio.GridAggregator, "average").
    _C.TEST.VOLUME.PATCH_SIZE = []
    _C.TEST.VOLUME.PATCH_OVERLAP = [16, 16, 16]

    _C.TEST.SEMANTIC = CN()
    # SemanticIoUEvaluator: a pixel is foreground where its probability exceeds this.
    _C.TEST.SEMANTIC.THRESHOLD = 0.5

    # Optimizer built by sharp_fpn.d2.engine.Trainer for every model: "SGD" (detectron2's, with
    # SOLVER.MOMENTUM and NESTEROV), "Adam" or "AdamW" (torch's, default betas); all use
    # SOLVER.BASE_LR, WEIGHT_DECAY, WEIGHT_DECAY_NORM, BIAS_LR_FACTOR and CLIP_GRADIENTS.
    _C.SOLVER.OPTIMIZER = "SGD"
    return cfg


def check_value(key: str, value: Any, ok: bool, expected: str) -> None:
    """Raise ``ValueError("KEY: expected EXPECTED, got VALUE")`` unless ``ok``.

    For builders that validate config values: the message names the key to fix.
    """
    if not ok:
        raise ValueError(f"{key}: expected {expected}, got {value!r}")
