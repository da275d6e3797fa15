"""sharp-fpn's config keys, added to a detectron2 config by :func:`add_sharp_fpn_config`.

Every key is listed here with what it does and its default; a key in a yaml file that is not
defined here or by detectron2 fails at merge time, naming the key.
"""
from detectron2.config import CfgNode as CN


def add_sharp_fpn_config(cfg: CN) -> CN:
    """Add sharp-fpn's keys (with their defaults) to ``cfg`` in place; return it."""
    _C = cfg

    # ---------------------------------------------------------------------------------------
    # Evaluation of instance models (Table 2's lower half and the DSB2018 challenge metric)
    # ---------------------------------------------------------------------------------------
    _C.TEST.DSB = CN()
    # Predicted instances scoring below this are dropped before the DSB score and the
    # foreground IoU/Dice are computed (COCO AP always uses every detection).
    _C.TEST.DSB.SCORE_THRESHOLD = 0.5
    return cfg
