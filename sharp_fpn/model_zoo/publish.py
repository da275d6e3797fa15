"""Publish a training run into the model zoo (``tools/publish_model.py``).

:func:`publish` turns a run folder (its ``config.yaml``, as detectron2 dumps it, and a
checkpoint) into the zoo entry ``<zoo>/<name>/`` (:mod:`sharp_fpn.model_zoo`):

* ``model.pth``: only the checkpoint's ``"model"`` state dict (no optimizer, scheduler or
  iteration), every floating tensor in float16, the others as they are; refused above
  :data:`~sharp_fpn.model_zoo.MAX_WEIGHTS_BYTES` or where a value does not fit float16;
* ``config.yaml``: the run's whole config (a ``_BASE_`` is refused) with ``MODEL.WEIGHTS``
  cleared and ``MODEL.DEVICE`` ``"cpu"``;
* ``MODEL_CARD.md``: rendered from the facts (:data:`FACT_KEYS`, :func:`render_card`);
* the index entry (sha256, size, the config's ``INPUT.NUCLEUS_DIAMETER``), the index rewritten
  atomically.

Before anything replaces the zoo's files, the new folder is staged beside them and its
weights loaded into the model its config builds, through
:class:`sharp_fpn.d2.predictor.NucleiPredictor` (the same check prediction makes).

The facts (a json object) the card is rendered from; see :data:`FACT_KEYS`::

    {"training_data": "synthetic nuclei v2, 2000 images, styles fluorescence, he, brightfield",
     "seed": 0, "iterations": 6000,
     "recipe": ["percentile normalisation", "photometric augmentation", "scales 0.5-2"],
     "heldout": "synthetic nuclei v2, seed 1, 50 images per style",
     "metric": "DSB2018 score", "baseline": "threshold + distance-transform watershed",
     "scores": {"fluorescence": {"model": 0.62, "baseline": 0.35}, "he": {...}},
     "throughput": "1.4 MP/s, 1024x1024 image with ~500 nuclei, 2 CPU cores",
     "command": "python tools/train_net.py --config-file configs/zoo/... ",
     "selection": "Mask R-CNN# won over the plain FPN by +0.04 DSB score (0.62 vs 0.58)",
     "notes": "optional free text"}

Torch and detectron2 are imported inside the functions that need them.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import yaml

from ..utils import atomic_write
from . import (
    CARD_NAME,
    CONFIG_NAME,
    INDEX_NAME,
    MAX_WEIGHTS_BYTES,
    WEIGHTS_NAME,
    ModelEntry,
    ZooError,
    file_sha256,
    read_index,
    zoo_root,
)

__all__ = ["FACT_KEYS", "NAME_PATTERN", "convert_weights", "load_facts", "publish",
           "render_card", "zoo_config"]

#: A zoo model's name: lower-case letters, digits, ``_``, ``-``, ``.``; a letter or digit first.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")

#: The facts a model card is rendered from: key -> (required, what it says).
FACT_KEYS: Dict[str, tuple] = {
    "training_data": (True, "what the model was trained on (synthetic only): generator, "
                            "version, images, styles"),
    "seed": (True, "the seed of the training data (and of training)"),
    "iterations": (True, "training iterations"),
    "recipe": (True, "the recipe: normalisation, augmentations, scales, mask resolution "
                     "(a string or a list of strings)"),
    "heldout": (True, "the held-out synthetic data the scores are measured on (its seed)"),
    "scores": (True, "per style: {\"model\": score, \"baseline\": score} on the held-out data"),
    "metric": (False, "what the scores are (default: DSB2018 score)"),
    "baseline": (False, "the classical baseline (default: threshold + watershed)"),
    "throughput": (True, "prediction speed (a string, or a number of megapixels/s)"),
    "command": (True, "the command that re-creates the model"),
    "selection": (True, "which candidate won and by how much (a string, or "
                        "{\"winner\", \"runner_up\", \"margin\"})"),
    "notes": (False, "anything else worth saying (free text)"),
}

SYNTHETIC_ONLY = "Trained on synthetic data only"


# --------------------------------------------------------------------------------------------
# facts and card


def load_facts(facts: Union[Mapping[str, Any], str, os.PathLike]) -> Dict[str, Any]:
    """The facts (a mapping, or a json file) checked against :data:`FACT_KEYS`."""
    if not isinstance(facts, Mapping):
        path = Path(facts)
        try:
            facts = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ZooError(f"{path}: no such facts file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ZooError(f"{path}: not a readable json facts file ({e})") from None
        if not isinstance(facts, Mapping):
            raise ZooError(f"{path}: the facts must be a json object")
    facts = dict(facts)
    missing = [k for k, (required, _) in FACT_KEYS.items() if required and k not in facts]
    unknown = sorted(set(facts) - set(FACT_KEYS))
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else [])
        raise ZooError(f"model card facts: {'; '.join(parts)} (keys: {', '.join(FACT_KEYS)})")
    scores = facts["scores"]
    if not isinstance(scores, Mapping) or not scores or not all(
            isinstance(v, Mapping) and "model" in v and "baseline" in v for v in scores.values()):
        raise ZooError('model card facts: "scores" must map each style to '
                       '{"model": score, "baseline": score}')
    return facts


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value)
    return str(value)


def _score(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def render_card(entry: ModelEntry, facts: Mapping[str, Any]) -> str:
    """The model card (markdown) of ``entry`` from checked ``facts``."""
    metric = facts.get("metric", "DSB2018 score")
    baseline = facts.get("baseline", "threshold + distance-transform watershed (scikit-image)")
    throughput = facts["throughput"]
    if isinstance(throughput, (int, float)):
        throughput = f"{throughput:.2f} megapixels/s"
    selection = facts["selection"]
    if isinstance(selection, Mapping):
        selection = (f"{selection.get('winner', '?')} won over {selection.get('runner_up', '?')}"
                     f" by {selection.get('margin', '?')}")
    recipe = facts["recipe"]
    recipe_lines = ([f"- {r}" for r in recipe] if isinstance(recipe, (list, tuple))
                    else [f"- {recipe}"])
    rows = [f"| {style} | {_score(s['model'])} | {_score(s['baseline'])} |"
            for style, s in facts["scores"].items()]
    diameter = (f"{entry.nucleus_diameter:g} px (`tools/predict.py --diameter` rescales images "
                f"to it; estimated per image when omitted)" if entry.nucleus_diameter > 0
                else "not known (`--diameter` is refused for this model)")
    lines = [
        f"# {entry.name}",
        "",
        entry.description,
        "",
        f"**{SYNTHETIC_ONLY}.** No real image was used for training, tuning or choosing this "
        "model; it is judged on real images kept outside the project. Trained on synthetic "
        "data alone, the weights carry no licence of anyone's images.",
        "",
        "## Use",
        "",
        f"    python tools/predict.py --model {entry.name} --input IMAGES/ --output OUT/",
        "",
        f"- modalities: {', '.join(entry.modalities)}",
        f"- nucleus diameter: {diameter}",
        f"- weights: `{entry.weights}`, float16, {entry.size_bytes} bytes, sha256 "
        f"`{entry.sha256}`",
        "",
        "## Training",
        "",
        f"- data: {_text(facts['training_data'])} (seed {facts['seed']})",
        f"- iterations: {facts['iterations']}",
        "- recipe:",
        *["  " + line for line in recipe_lines],
        "",
        "Re-create it with:",
        "",
        f"    {facts['command']}",
        "",
        "## Held-out synthetic scores",
        "",
        f"On {_text(facts['heldout'])}; {metric}, the classical baseline ({baseline}) beside it.",
        "",
        f"| style | {entry.name} | baseline |",
        "|---|---|---|",
        *rows,
        "",
        f"Throughput: {throughput}.",
        "",
        "## Selection",
        "",
        _text(selection),
        "",
    ]
    if facts.get("notes"):
        lines += ["## Notes", "", _text(facts["notes"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# config and weights


def zoo_config(config_file: Union[str, os.PathLike]) -> Dict[str, Any]:
    """A run's dumped config as a zoo config: whole (a ``_BASE_`` refused), ``MODEL.WEIGHTS``
    cleared, ``MODEL.DEVICE`` ``"cpu"``."""
    path = Path(config_file)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZooError(f"{path}: no such config (a training run's dumped config.yaml)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ZooError(f"{path}: not a readable yaml config ({' '.join(str(e).split())})") \
            from None
    if not isinstance(config, dict) or not isinstance(config.get("MODEL"), dict):
        raise ZooError(f"{path}: not a detectron2 config (no MODEL section)")
    if "_BASE_" in config:
        raise ZooError(f"{path}: has a _BASE_; a zoo model needs the whole config a training "
                       f"run dumps (its OUTPUT_DIR/config.yaml)")
    config["MODEL"]["WEIGHTS"] = ""
    config["MODEL"]["DEVICE"] = "cpu"
    return config


def convert_weights(checkpoint: Union[str, os.PathLike]) -> bytes:
    """The checkpoint's ``"model"`` state dict with floating tensors in float16, serialised
    (``torch.save`` of ``{"model": ...}``)."""
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise ZooError(f"{path}: no such checkpoint")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001  a run's own checkpoint with non-tensor extras
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ZooError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:200]})") from None
    state = data.get("model") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state:
        raise ZooError(f"{path}: holds no \"model\" state dict")
    half: Dict[str, Any] = {}
    limit = float(torch.finfo(torch.float16).max)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ZooError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point():
            if value.numel() and float(value.detach().abs().max()) > limit:
                raise ZooError(f"{path}: {key} holds values beyond float16's range ({limit:g})")
            value = value.detach().to(torch.float16)
        half[key] = value.contiguous().clone()
    buffer = io.BytesIO()
    torch.save({"model": half}, buffer)
    return buffer.getvalue()


def _check_loads(folder: Path) -> None:
    """The staged weights load into the model the staged config builds, as predict loads them."""
    from ..d2.predictor import NucleiPredictor

    try:
        NucleiPredictor(str(folder / CONFIG_NAME), str(folder / WEIGHTS_NAME), device="cpu")
    except Exception as e:  # noqa: BLE001  ConfigError, a weights misfit
        raise ZooError(f"the converted model does not load: {' '.join(str(e).split())}") \
            from None


# --------------------------------------------------------------------------------------------
# publish


def publish(
    run_dir: Union[str, os.PathLike],
    name: str,
    description: str,
    modalities: Sequence[str],
    facts: Union[Mapping[str, Any], str, os.PathLike],
    *,
    checkpoint: str = "model_final.pth",
    default: bool = False,
    zoo: Optional[Union[str, os.PathLike]] = None,
    replace: bool = False,
    check: bool = True,
) -> ModelEntry:
    """Publish the training run ``run_dir`` as zoo model ``name`` (module docstring).

    Args:
        run_dir: the run's folder: ``config.yaml`` and ``checkpoint`` in it.
        name: the model's name (:data:`NAME_PATTERN`).
        description: one line for ``--list-models``.
        modalities: what it serves (``fluorescence``, ``he``, ``brightfield``...).
        facts: the model card's facts, a mapping or a json file (:data:`FACT_KEYS`).
        checkpoint: the checkpoint file in ``run_dir`` (or a path).
        default: make it the zoo's default model (the first model of a zoo is anyway).
        zoo: the zoo folder (default :func:`~sharp_fpn.model_zoo.zoo_root`).
        replace: replace a model of that name already in the zoo.
        check: load the converted weights into the model before publishing (detectron2).

    Returns:
        The new entry. Raises :class:`~sharp_fpn.model_zoo.ZooError` naming the problem.
    """
    if not NAME_PATTERN.fullmatch(name or ""):
        raise ZooError(f"--name {name!r}: a model name is lower-case letters, digits, '_', '-' "
                       f"and '.', starting with a letter or digit (at most 64)")
    if not description.strip():
        raise ZooError("--description: a model needs a one-line description")
    modalities = [m.strip() for m in modalities if m.strip()]
    if not modalities:
        raise ZooError("--modalities: name at least one (fluorescence, he, brightfield...)")
    facts = load_facts(facts)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ZooError(f"{run_dir}: no such training run folder")
    root = zoo_root() if zoo is None else Path(zoo)
    index = read_index(root)
    if name in index["models"] and not replace:
        raise ZooError(f"{root / name}: the zoo already has a model {name!r} (--replace to "
                       f"replace it)")

    config = zoo_config(run_dir / CONFIG_NAME)
    diameter = float((config.get("INPUT") or {}).get("NUCLEUS_DIAMETER", 0.0) or 0.0)
    weights = convert_weights(run_dir / checkpoint)
    if len(weights) > MAX_WEIGHTS_BYTES:
        raise ZooError(f"{run_dir / checkpoint}: its float16 weights take {len(weights)} bytes, "
                       f"more than a zoo model's {MAX_WEIGHTS_BYTES}: refused")

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".staging"))
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0o700 would ship a folder only its owner reads
        (staging / CONFIG_NAME).write_text(
            yaml.safe_dump(config, sort_keys=True, default_flow_style=None), encoding="utf-8")
        (staging / WEIGHTS_NAME).write_bytes(weights)
        entry = ModelEntry(
            name=name, description=" ".join(description.split()), modalities=tuple(modalities),
            weights=WEIGHTS_NAME, sha256=file_sha256(staging / WEIGHTS_NAME),
            size_bytes=len(weights), nucleus_diameter=diameter, card=CARD_NAME,
            folder=root / name, is_default=default or not index["models"],
        )
        (staging / CARD_NAME).write_text(render_card(entry, facts), encoding="utf-8")
        if check:
            _check_loads(staging)
        target = root / name
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".old"))
            os.replace(target, old / name)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

    index = read_index(root)  # as it is now
    index["models"][name] = entry.to_index()
    if entry.is_default or index.get("default") is None and len(index["models"]) == 1:
        index["default"] = name
    with atomic_write(root / INDEX_NAME, "w", encoding="utf-8") as f:
        json.dump({"models": dict(sorted(index["models"].items())),
                   "default": index["default"]}, f, indent=2)
        f.write("\n")
    return entry
