"""The nuclei models shipped with sharp-fpn: a registry, read from ``index.json``.

Each model lives in its own folder ``<zoo>/<name>/`` beside the index:

* ``config.yaml``: the whole config the training run dumped (no ``_BASE_``), with
  ``MODEL.WEIGHTS`` cleared and ``MODEL.DEVICE`` ``"cpu"``;
* ``model.pth``: the weights, ``{"model": {key: tensor}}`` with every floating tensor in
  float16 (the others as they were), at most :data:`MAX_WEIGHTS_BYTES`; no optimizer, no
  scheduler;
* ``MODEL_CARD.md``: what it was trained on (synthetic data only), how, how well it does on
  held-out synthetic data beside a classical baseline, and the command that re-creates it.

``index.json``::

    {"models": {"<name>": {"name", "description", "modalities": [...], "weights": "model.pth",
                            "sha256", "size_bytes", "nucleus_diameter", "card": "MODEL_CARD.md"}},
     "default": "<name>" or null}

The zoo is the folder of this package unless the environment variable :data:`ZOO_ENV`
(``SHARP_FPN_MODEL_ZOO``) names another. :func:`resolve` gives a model's config and weights
files after checking the weights' sha256 against the index (once per process and file).
Models are added by :mod:`.publish` (``tools/publish_model.py``).

No torch, no detectron2: this module reads json and files only.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "INDEX_NAME",
    "MAX_WEIGHTS_BYTES",
    "WEIGHTS_NAME",
    "ZOO_ENV",
    "ModelEntry",
    "NoModelError",
    "UnknownModelError",
    "WeightsMismatch",
    "ZooError",
    "default_model_name",
    "file_sha256",
    "get_model",
    "list_models",
    "read_index",
    "resolve",
    "verify_weights",
    "zoo_root",
]

#: Environment variable naming another zoo folder (tests, a site's own models).
ZOO_ENV = "SHARP_FPN_MODEL_ZOO"
INDEX_NAME = "index.json"
CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.pth"
CARD_NAME = "MODEL_CARD.md"
#: Largest weights file a zoo model may have (30 MB): it lives in the git repository.
MAX_WEIGHTS_BYTES = 30 * 1000 * 1000
#: What an entry of ``index.json`` must have.
ENTRY_KEYS = ("name", "description", "modalities", "weights", "sha256", "size_bytes",
              "nucleus_diameter", "card")

_VERIFIED: Dict[Tuple[str, int, int, str], bool] = {}  # (realpath, size, mtime, sha256)


class ZooError(ValueError):
    """The zoo cannot give what was asked (one line naming the model or file)."""


class NoModelError(ZooError):
    """The zoo holds no model (yet)."""


class UnknownModelError(ZooError, KeyError):
    """No model of that name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsMismatch(ZooError):
    """A weights file whose sha256 is not the index's."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the zoo, as its index entry says, and where its files are."""

    name: str
    description: str
    modalities: Tuple[str, ...]
    weights: str
    sha256: str
    size_bytes: int
    nucleus_diameter: float
    card: str
    folder: Path = field(compare=False)
    is_default: bool = False

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_NAME

    @property
    def weights_path(self) -> Path:
        return self.folder / self.weights

    @property
    def card_path(self) -> Path:
        return self.folder / self.card

    def to_index(self) -> Dict[str, Any]:
        """The entry as ``index.json`` holds it."""
        return {
            "name": self.name, "description": self.description,
            "modalities": list(self.modalities), "weights": self.weights,
            "sha256": self.sha256, "size_bytes": int(self.size_bytes),
            "nucleus_diameter": float(self.nucleus_diameter), "card": self.card,
        }


def zoo_root() -> Path:
    """The zoo folder: ``$SHARP_FPN_MODEL_ZOO`` when set, else this package's folder."""
    override = os.environ.get(ZOO_ENV, "").strip()
    return Path(override).expanduser() if override else Path(__file__).resolve().parent


def _root(root: Optional[os.PathLike]) -> Path:
    return zoo_root() if root is None else Path(root)


def read_index(root: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """``index.json`` of the zoo, checked: ``{"models": {name: entry}, "default": name|None}``.
    A zoo folder without an index is an empty zoo."""
    path = _root(root) / INDEX_NAME
    if not path.exists():
        return {"models": {}, "default": None}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooError(f"{path}: not a readable model index ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("models"), dict):
        raise ZooError(f"{path}: not a model index (expected {{\"models\": {{...}}, "
                       f"\"default\": ...}})")
    for name, entry in index["models"].items():
        missing = [k for k in ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ZooError(f"{path}: model {name!r} lacks {', '.join(missing)}")
    default = index.get("default")
    if default is not None and default not in index["models"]:
        raise ZooError(f"{path}: the default model {default!r} is not in the index")
    index.setdefault("default", None)
    return index


def _entry(name: str, raw: Dict[str, Any], root: Path, default: Optional[str]) -> ModelEntry:
    return ModelEntry(
        name=str(raw["name"]), description=str(raw["description"]),
        modalities=tuple(str(m) for m in raw["modalities"]), weights=str(raw["weights"]),
        sha256=str(raw["sha256"]).lower(), size_bytes=int(raw["size_bytes"]),
        nucleus_diameter=float(raw["nucleus_diameter"]), card=str(raw["card"]),
        folder=root / name, is_default=name == default,
    )


def list_models(root: Optional[os.PathLike] = None) -> List[ModelEntry]:
    """Every model of the zoo, by name."""
    root = _root(root)
    index = read_index(root)
    return [_entry(name, index["models"][name], root, index["default"])
            for name in sorted(index["models"])]


def _no_model_message(root: Path) -> str:
    return (f"no nuclei model is shipped in this install yet; give --config-file and --weights "
            f"of a trained model (tools/train_net.py makes one), or publish one into the model "
            f"zoo {root} with tools/publish_model.py")


def get_model(name: str, root: Optional[os.PathLike] = None) -> ModelEntry:
    """The model ``name``; :class:`UnknownModelError` listing the known ones otherwise."""
    models = {m.name: m for m in list_models(root)}
    if name in models:
        return models[name]
    if not models:
        raise UnknownModelError(f"--model {name}: {_no_model_message(_root(root))}")
    raise UnknownModelError(f"--model {name}: no such model in the zoo {_root(root)}; known "
                            f"models: {', '.join(sorted(models))}")


def default_model_name(root: Optional[os.PathLike] = None) -> Optional[str]:
    """The zoo's default model (None when it has none): the index's ``default``, or its only
    model when it holds exactly one."""
    index = read_index(root)
    if index["default"] is not None:
        return index["default"]
    return next(iter(index["models"])) if len(index["models"]) == 1 else None


def file_sha256(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(entry: ModelEntry) -> Path:
    """``entry``'s weights file once its size limit and sha256 are checked (the hash once per
    process and file); :class:`ZooError` / :class:`WeightsMismatch` naming the file otherwise."""
    path = entry.weights_path
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise ZooError(f"{path}: the weights of zoo model {entry.name!r} are missing") from None
    if stat.st_size > MAX_WEIGHTS_BYTES:
        raise ZooError(f"{path}: {stat.st_size} bytes, more than a zoo model's "
                       f"{MAX_WEIGHTS_BYTES} bytes: refused")
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, entry.sha256)
    if not _VERIFIED.get(key):
        actual = file_sha256(path)
        if actual != entry.sha256:
            raise WeightsMismatch(
                f"{path}: sha256 {actual} does not match the zoo index's {entry.sha256} for "
                f"model {entry.name!r}: the file was changed or damaged; refused"
            )
        _VERIFIED[key] = True
    return path


def resolve(name: Optional[str] = None,
            root: Optional[os.PathLike] = None) -> Tuple[Path, Path]:
    """``(config file, weights file)`` of the model ``name`` (default: the zoo's default),
    its weights checked (:func:`verify_weights`).

    Raises:
        NoModelError: the zoo holds no model, or several and no default.
        UnknownModelError: no model ``name`` (the message lists the known ones).
        ZooError, WeightsMismatch: a file missing, too large, or not the one the index names.
    """
    root = _root(root)
    if name is None:
        name = default_model_name(root)
        if name is None:
            models = list_models(root)
            if not models:
                raise NoModelError(_no_model_message(root))
            raise NoModelError(f"the model zoo {root} names no default model; choose one with "
                               f"--model ({', '.join(m.name for m in models)})")
    entry = get_model(name, root)
    if not entry.config_path.is_file():
        raise ZooError(f"{entry.config_path}: the config of zoo model {name!r} is missing")
    return entry.config_path, verify_weights(entry)
