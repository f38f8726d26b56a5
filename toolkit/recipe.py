"""Recipes: TOML -> frozen dataclasses, strict keys, typed `--set section.key=value` overrides.

A recipe fully describes a run. Every key has a default here, with a comment saying what it does,
so a recipe file only names what it changes. Unknown keys are errors, never silently ignored.

One override is a shortcut rather than a key: `--set train.epochs=N` sets the last stage's epochs
(earlier stages, such as a head-only warm-up, keep theirs).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from toolkit.errors import CellfuseError


@dataclass(frozen=True)
class DataConfig:
    train: str = "outputs/clean/clean.npz"  # training npz (normally `cellfuse clean` output) or class folder
    val_fraction: float = 0.15  # stratified validation split taken from `train`
    split_seed: int = 0  # seed of that split (keep it fixed across members of one ensemble)
    extra_val: tuple[str, ...] = ()  # more validation files, reported separately (e.g. a corrupted set)
    n_classes: int = 8
    limit: int = 0  # use only the first N training rows (0 = all): quick experiments


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "efficientnetv2-b0"  # a name in toolkit.backbones.BACKBONES, or "hub:<keras-hub preset>"
    weights: str = "imagenet"  # "imagenet" | "none" (random init) | path to a weights file
    input_size: int = 0  # side the backbone sees; 0 = the backbone's default. Resizing is inside the model
    head: str = "seed"  # "seed": GAP-BN-Drop-1024-Drop-512-Drop-n; "linear": GAP-Drop-n
    dropout: float = 0.3
    bn_momentum: float = 0.9  # of every BatchNorm's moving statistics; Keras' 0.99 lags short runs badly
    width: float = 1.0  # width multiplier (efficientnetv2-custom only)
    depth: float = 1.0  # depth multiplier (efficientnetv2-custom only)


@dataclass(frozen=True)
class Stage:
    epochs: int = 1
    lr: float = 1e-3
    unfreeze: float = 1.0  # fraction of backbone layers trained, from the top: 0 = head only, 1 = all


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    stages: tuple[Stage, ...] = (Stage(),)
    optimizer: str = "adamw"  # adamw | lion | sgd
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine (with warm-up) | plateau | constant, within each stage
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    consistency: float = 0.0  # AugMix JSD weight (12.0 in the paper; 0 = off); needs [augment] augmix = true
    class_weights: str = "none"  # none | balanced
    early_stopping: int = 0  # patience in epochs on `monitor`; 0 = off
    monitor: str = "val_auc"  # val_auc | val_accuracy: picks the best checkpoint (never the loss)
    ema: bool = False  # exponential moving average of weights, used for validation and the checkpoint
    freeze_batchnorm: bool = False  # BatchNorm keeps training by default (freezing it hurt the seed team)
    mixed_precision: str = "auto"  # auto (on with a GPU) | on | off
    xla: bool = False  # jit_compile the train step (GPU)
    # auto: MultiWorkerMirroredStrategy when TF_CONFIG names several workers, else MirroredStrategy over
    # several GPUs | mirrored | multi-worker | none
    distribute: str = "auto"
    steps_per_epoch: int = 0  # 0 = one pass over the data
    checkpoint_every: int = 50  # steps between resumable backups inside an epoch
    seed: int = 0


@dataclass(frozen=True)
class DistillConfig:
    # cached: the teacher's probabilities on un-augmented images, computed once | function-matching: the
    # teacher on the fly, on the student's augmented view | bank: bank_views augmented views per image,
    # each labelled by the teacher once, then reused (function matching with the teacher paid up front)
    mode: str = "cached"
    bank_views: int = 6  # bank mode: views per training image (held in memory: views x images x 27 kB)
    temperature: float = 4.0
    alpha: float = 0.1  # weight of cross-entropy on true labels; 1 - alpha on the teacher's KL
    # "": the backbone starts from [model] weights; "best-member" or a member's name: from that trained
    # member's backbone (same backbone, any input size). The head always starts fresh.
    init: str = ""
    # function-matching only: the teacher also averages its TTA views on every step (x views its cost).
    # Off, it runs its members on the student's own view; cached mode always uses the views.
    teacher_tta: bool = False
    # Mixing (MixUp/CutMix) comes from [augment], and applies to the teacher's view too.


@dataclass(frozen=True)
class Recipe:
    name: str
    path: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: dict = field(default_factory=dict)  # checked by toolkit.augment.check_section
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig | None = None

    def to_toml(self) -> str:
        return dump_toml(as_dict(self))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "distill": DistillConfig}
CHOICES = {
    ("model", "head"): {"seed", "linear"},
    ("train", "optimizer"): {"adamw", "lion", "sgd"},
    ("train", "schedule"): {"cosine", "plateau", "constant"},
    ("train", "class_weights"): {"none", "balanced"},
    ("train", "monitor"): {"val_auc", "val_accuracy"},
    ("train", "mixed_precision"): {"auto", "on", "off"},
    ("train", "distribute"): {"auto", "mirrored", "multi-worker", "none"},
    ("distill", "mode"): {"cached", "function-matching", "bank"},
}


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Parse a recipe file, apply `section.key=value` overrides, check every key and type."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CellfuseError(f"{path}: no such recipe") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CellfuseError(f"{path}: not valid TOML ({e})") from None
    for item in overrides:
        apply_override(raw, item, path)
    return build_recipe(raw, path)


def build_recipe(raw: dict, path: Path) -> Recipe:
    raw = dict(raw)
    name = raw.pop("name", path.stem)
    unknown = set(raw) - set(SECTIONS) - {"augment"}
    if unknown:
        raise CellfuseError(f"{path}: unknown section(s) {sorted(unknown)}; "
                            f"known: name, {', '.join(SECTIONS)}, augment")
    sections = {key: _section(cls, raw.get(key, {}), path, key) for key, cls in SECTIONS.items()
                if key in raw or key != "distill"}
    from toolkit.augment import check_section

    augment = check_section(raw.get("augment", {}), f"{path} [augment]")
    return Recipe(name=str(name), path=str(path), augment=augment, **sections)


def _section(cls, values, path: Path, key: str):
    if not isinstance(values, dict):
        raise CellfuseError(f"{path}: [{key}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        hint = "; epochs are per stage (train.stages), and --set train.epochs=N sets the last stage's" \
            if key == "train" and "epochs" in unknown else ""
        raise CellfuseError(f"{path}: unknown key(s) {sorted(unknown)} in [{key}]; "
                            f"known: {', '.join(fields)}{hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{path}: {key}.{k}") for k, v in values.items()}
    for k, v in kwargs.items():
        allowed = CHOICES.get((key, k))
        if allowed and v not in allowed:
            raise CellfuseError(f"{path}: {key}.{k} = {v!r}; choose one of {sorted(allowed)}")
    return cls(**kwargs)


def _coerce(value, hint, where: str):
    """Check a TOML value against a dataclass field's type; ints widen to floats, lists to tuples."""
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and type(value) is not bool:
        raise CellfuseError(f"{where} must be true or false (lower case, as TOML writes them), got {value!r}")
    if hint in (int, str, bool, float):
        if type(value) is not hint:
            raise CellfuseError(f"{where} must be {hint.__name__}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise CellfuseError(f"{where} must be a list, got {value!r}")
        item = typing.get_args(hint)[0]
        if item is Stage:
            return tuple(_section(Stage, v, Path(where.split(":")[0]), "train.stages") for v in value)
        return tuple(_coerce(v, item, where) for v in value)
    raise CellfuseError(f"{where}: unsupported type {hint}")


def apply_override(raw: dict, item: str, path: Path) -> None:
    """`section.key=value`, value parsed as TOML (so 3, 1e-3, true, "x", [..] work), else a string."""
    key, sep, text = item.partition("=")
    if not sep or "." not in key and key != "name":
        raise CellfuseError(f"--set {item!r}: expected section.key=value, e.g. train.batch_size=32")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if key == "name":
        raw["name"] = str(value)
        return
    if key == "train.epochs":
        set_last_stage_epochs(raw, value, path)
        return
    section, _, name = key.partition(".")
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise CellfuseError(f"{path}: cannot override {key}: [{section}] is not a table")
    target[name] = value


def set_last_stage_epochs(raw: dict, epochs, path: Path) -> None:
    """`--set train.epochs=N`: the last stage trains N epochs; earlier stages (a head warm-up) stay."""
    if type(epochs) is not int or epochs < 1:
        raise CellfuseError(f"--set train.epochs={epochs!r}: expected a whole number of epochs, at least 1")
    train = raw.setdefault("train", {})
    stages = train.get("stages", [{}]) if isinstance(train, dict) else None
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise CellfuseError(f"{path}: cannot set train.epochs: train.stages is not a list of tables")
    train["stages"] = [*stages[:-1], {**stages[-1], "epochs": epochs}]


def as_dict(recipe: Recipe) -> dict:
    out = {"name": recipe.name}
    for key in SECTIONS:
        section = getattr(recipe, key)
        if section is not None:
            out[key] = dataclasses.asdict(section)
    out["augment"] = recipe.augment
    return out


def dump_toml(data: dict) -> str:
    """A minimal TOML writer for the recipe snapshot (tomllib only reads)."""
    lines = []
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
