"""Recipes: TOML -> frozen dataclasses, strict keys, checked values, typed `--set key=value` overrides.

A recipe file is a path, or the name of a recipe that ships with cellfuse (find_recipe):

    find_recipe("tiny")            -> .../toolkit/recipes/tiny.toml (the shipped file)
    find_recipe("my/tiny.toml")    -> my/tiny.toml (a path that exists is used as is)

A recipe fully describes a run. Every key has a default here, with a comment saying what it does,
so a recipe file only names what it changes. Unknown keys are errors (with a did-you-mean), never
silently ignored, and every value is checked at load against RULES, so a bad number stops the
command in one line naming the file (or the `--set`) and the key, before anything trains.

`--set` and sweep spaces share one key-path grammar: `section.key`, with `[i]` picking a list entry,
e.g. `--set 'train.stages[1].lr=1e-4'` (key_segments, get_key, set_key). One override is a shortcut
rather than a key: `--set train.epochs=N` sets the last stage's epochs (earlier stages, such as a
head-only warm-up, keep theirs).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import tomli_w

from toolkit.augment import DEFAULTS as AUGMENT_DEFAULTS
from toolkit.augment import check_section
from toolkit.errors import CellfuseError


@dataclass(frozen=True)
class DataConfig:
    train: str = "outputs/clean/clean.npz"  # training npz (normally `cellfuse clean` output) or class folder
    val_fraction: float = 0.15  # stratified validation split taken from `train`
    split_seed: int = 0  # seed of that split (keep it fixed across members of one ensemble)
    extra_val: tuple[str, ...] = ()  # more validation files, reported separately (e.g. a corrupted set)
    n_classes: int = 8
    limit: int = 0  # use only the first N training rows (0 = all): quick experiments
    # share of training rows corrupted once by the cellfuse mix, each at a random severity 1-5 (the
    # training families only, never the held-out ones): a corruption-tuned copy of a member (--from)
    corrupt_fraction: float = 0.0


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
    # per-image normalisation inside the model, before the backbone (trained with it, exported with it):
    # "" | "reinhard" (stain colour) | "grayworld" | "stretch" | "median3", or several joined by "+"
    normalize: str = ""


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
    # picks the best checkpoint (never the loss): val_auc | val_accuracy on the split, or <name>_accuracy on
    # an extra_val file (val_heldout_accuracy: corruptions no training saw; its figure is then cross-fitted)
    monitor: str = "val_auc"
    ema: bool = False  # exponential moving average of weights, used for validation and the checkpoint
    freeze_batchnorm: bool = False  # BatchNorm keeps training by default (freezing it hurt the seed team)
    mixed_precision: str = "auto"  # auto (on with a GPU) | on | off
    xla: bool = False  # jit_compile the train step (GPU)
    # auto: MultiWorkerMirroredStrategy when TF_CONFIG names several workers, else MirroredStrategy over
    # several GPUs | mirrored | multi-worker | none
    distribute: str = "auto"
    steps_per_epoch: int = 0  # 0 = one pass over the data
    checkpoint_every: int = 50  # steps between resumable backups inside an epoch
    # keep the last N epochs' weights as extra ensemble candidates (snapshot_e<epoch>.keras, Huang et al.
    # 2017) and their average (swa.keras, Izmailov et al. 2018); 0 = off
    snapshots: int = 0
    # a finished run (or .keras file) whose weights this run starts from (`cellfuse train --from RUN`); the
    # result's weight-space interpolation with it (WiSE-FT, Wortsman et al. 2022) is kept as wise.keras
    init_from: str = ""
    seed: int = 0
    # bit-for-bit repeatable training for one seed on one machine (TensorFlow's op determinism, augmentation
    # drawn in a fixed order); slower, since random tf.data maps then run one batch at a time
    deterministic: bool = False


# `[distill] init`: the most accurate member whose backbone is the student's (born-again distillation,
# Furlanello et al. 2018); the student keeps [model] weights when none is
MATCHING_MEMBER = "matching-member"


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
    # member's backbone (the same backbone, or one whose first layers the student's is, as a truncated
    # Lite0 from a Lite0 member; any input size); "matching-member": from the most accurate such member,
    # else from [model] weights. The head always starts fresh.
    init: str = ""
    # function-matching: the teacher also averages its TTA views on every step; bank: on each view it labels
    # (x views its cost, either way). Off, it runs its members on the student's own view; cached mode always
    # uses the views.
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
        """The recipe as run, every key written out: loading it gives this Recipe back."""
        return tomli_w.dumps(as_dict(self))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "distill": DistillConfig}
TOP_KEYS = ("name", *SECTIONS, "augment")
# Keys `--set` accepts that are not fields: listed among the known keys, and offered as did-you-mean.
SHORTCUTS = {"train": {"epochs": "epochs (--set only: the last stage's epochs)"}}


# ---------------------------------------------------------------- the rules every value obeys

@dataclass(frozen=True)
class Bound:
    """The interval a number must lie in; `also` is one more value accepted (a 0 meaning "default")."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # low itself refused
    high_open: bool = False  # high itself refused
    also: float | None = None

    def allows(self, value) -> bool:
        if value == self.also:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {low}"
        else:
            text = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return text if self.also is None else f"{_number(self.also)} or {text}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


AT_LEAST_0, AT_LEAST_1, ABOVE_0 = Bound(0), Bound(1), Bound(0, low_open=True)
FRACTION = Bound(0, 1, high_open=True)  # [0, 1)
SEED = Bound(0, 2**32 - 1)  # numpy refuses seeds outside it
# One rule per key: a Bound for numbers, a set of choices for strings. List entries share their
# list's rule (train.stages[1].lr is checked as train.stages.lr).
RULES: dict[str, Bound | frozenset] = {
    "data.val_fraction": Bound(0, 1, low_open=True, high_open=True),
    "data.split_seed": SEED,
    "data.n_classes": Bound(2),
    "data.limit": AT_LEAST_0,
    "model.head": frozenset({"seed", "linear"}),
    "model.normalize": frozenset({"", "reinhard", "grayworld", "stretch", "median3", "median3+reinhard",
                                  "grayworld+reinhard", "stretch+reinhard"}),
    # smaller inputs vanish under the backbones' strides; larger is past any pretraining size (600)
    "model.input_size": Bound(32, 1024, also=0),
    "model.dropout": FRACTION,
    "model.bn_momentum": FRACTION,
    "model.width": ABOVE_0,
    "model.depth": ABOVE_0,
    "train.batch_size": AT_LEAST_1,
    "train.stages.epochs": AT_LEAST_1,  # a 0-epoch stage would be skipped; all of them, an untrained model
    "train.stages.lr": ABOVE_0,
    "train.stages.unfreeze": Bound(0, 1),
    "train.optimizer": frozenset({"adamw", "lion", "sgd"}),
    "train.weight_decay": AT_LEAST_0,
    "train.schedule": frozenset({"cosine", "plateau", "constant"}),
    "train.warmup_epochs": AT_LEAST_0,
    "train.label_smoothing": FRACTION,
    "train.consistency": AT_LEAST_0,
    "train.class_weights": frozenset({"none", "balanced"}),
    "train.early_stopping": AT_LEAST_0,
    "train.mixed_precision": frozenset({"auto", "on", "off"}),
    "train.distribute": frozenset({"auto", "mirrored", "multi-worker", "none"}),
    "train.steps_per_epoch": AT_LEAST_0,
    "train.checkpoint_every": AT_LEAST_1,
    "train.snapshots": AT_LEAST_0,
    "data.corrupt_fraction": Bound(0, 1),
    "train.seed": SEED,
    "distill.mode": frozenset({"cached", "function-matching", "bank"}),
    "distill.bank_views": AT_LEAST_1,
    "distill.temperature": ABOVE_0,
    "distill.alpha": Bound(0, 1),
}
# A run's name is its folder's name: one plain path component, never ".", "..", "a/b" or hidden.
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _check_rule(key: str, value, where: str):
    rule = RULES.get(re.sub(r"\[\d+\]", "", key))
    if isinstance(rule, Bound) and not rule.allows(value):
        raise CellfuseError(f"{where}: {key} = {value!r}: must be {rule}")
    if isinstance(rule, frozenset) and value not in rule:
        raise CellfuseError(f"{where}: {key} = {value!r}; choose one of {sorted(rule)}")
    return value


@dataclass(frozen=True)
class Origin:
    """Where a recipe's values came from, so a message blames the right one: the file or a `--set`."""
    path: Path
    overrides: tuple[tuple[str, str], ...] = ()  # (key path written, the --set text), in order
    file_keys: frozenset[str] = frozenset()  # every key path the file itself writes

    def of(self, key: str) -> str:
        """`--set ...` when the last override to write `key` (or a table or list holding it) did, or when
        the file lacks `key` and an override wrote inside it (a section `--set` made up); else the file."""
        for written, item in reversed(self.overrides):
            if _within(key, written) or (key not in self.file_keys and _within(written, key)):
                return f"--set {item}"
        return str(self.path)

    def of_table(self, table: str) -> str:
        """The file, plus every `--set` that wrote into `table`: for checks that see the table whole."""
        items = [item for written, item in self.overrides if _within(written, table)]
        return f"{self.path} (with --set {', '.join(items)})" if items else str(self.path)


def _within(key: str, table: str) -> bool:
    """`key` is `table` or lies inside it (train.stages[1].lr is within train.stages and train)."""
    return key == table or key.startswith((f"{table}.", f"{table}["))


def _key_paths(node, at: str = "") -> set[str]:
    """Every key path in a parsed recipe: train, train.stages, train.stages[0], train.stages[0].lr..."""
    if isinstance(node, dict):
        children = [(_join(at, k), v) for k, v in node.items()]
    elif isinstance(node, list):
        children = [(f"{at}[{i}]", v) for i, v in enumerate(node)]
    else:
        return set()
    return {path for key, value in children for path in (key, *_key_paths(value, key))}


# ---------------------------------------------------------------- finding a recipe: a path, or a shipped one's name

# The shipped recipes live in the checkout's top-level recipes/ and install as the package data of
# toolkit.recipes (pyproject.toml), so importlib.resources finds them after any install, editable or not.
SHIPPED_PACKAGE = "toolkit.recipes"


def shipped_dir() -> Path:
    """The installed recipes folder (the checkout's recipes/ under an editable install)."""
    try:
        folder = Path(str(files(SHIPPED_PACKAGE)))
    except ModuleNotFoundError:
        raise CellfuseError(f"the shipped recipes ({SHIPPED_PACKAGE}) are not installed; reinstall cellfuse "
                            "(`make install`, or pip install .)") from None
    return folder


def shipped_names() -> list[str]:
    """Names of the shipped recipes (file stems), search spaces excluded."""
    return sorted(p.stem for p in shipped_dir().glob("*.toml"))


def shipped_recipe(name: str) -> Path:
    """The shipped recipe `name` (with or without .toml; `spaces/x` for a search space)."""
    found = shipped_file(name)
    if found is None:
        raise CellfuseError(f"{name}: no such shipped recipe; `cellfuse recipes` lists them" + did_you_mean_recipe(name))
    return found


def shipped_file(name: str) -> Path | None:
    """The shipped file called `name` (with or without .toml; `spaces/x` for a search space), or None."""
    folder = shipped_dir()
    path = folder / (name if name.endswith(".toml") else f"{name}.toml")
    if path.is_file() and path.resolve().is_relative_to(folder.resolve()):
        return path
    return None


def find_recipe(arg: str | Path) -> Path:
    """A recipe file: a file that exists is used as is; otherwise a shipped recipe's name (a folder of
    that name, such as a run folder, is never a recipe, so it does not hide the shipped one)."""
    if Path(arg).is_file():
        return Path(arg)
    found = shipped_file(str(arg))
    if found is None and Path(arg).is_dir():
        raise CellfuseError(f"{arg}: is a folder, not a recipe file" + did_you_mean_recipe(str(arg)))
    if found is None:
        raise CellfuseError(f"{arg}: does not exist, and no shipped recipe has that name; `cellfuse recipes` lists them"
                            + did_you_mean_recipe(str(arg)))
    return found


def find_space(arg: str | Path) -> Path:
    """A search-space file: a path that exists, else a shipped space's name (`tiny` or `spaces/tiny`),
    never a recipe of that name."""
    if Path(arg).exists():
        return Path(arg)
    name = str(arg).removeprefix("spaces/")
    found = shipped_file(f"spaces/{name}")
    if found is None:
        shipped = sorted(p.stem for p in (shipped_dir() / "spaces").glob("*.toml"))
        close = difflib.get_close_matches(Path(name).name.removesuffix(".toml"), shipped, n=1, cutoff=0.6)
        raise CellfuseError(f"{arg}: does not exist, and no shipped search space has that name (shipped: "
                            f"{', '.join(f'spaces/{s}' for s in shipped)})"
                            + (f"; did you mean 'spaces/{close[0]}'?" if close else ""))
    return found


def did_you_mean_recipe(arg: str) -> str:
    stem = Path(arg).name.removesuffix(".toml")
    close = difflib.get_close_matches(stem, shipped_names(), n=1, cutoff=0.6)
    return f" (did you mean the shipped recipe {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------- loading

def read_toml(path: str | Path, what: str = "recipe") -> dict:
    """A TOML file as a dict; a missing, unreadable or malformed file is one line naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CellfuseError(f"{path}: no such {what} (the file does not exist)") from None
    except IsADirectoryError:
        raise CellfuseError(f"{path}: is a folder, not a {what} file") from None
    except OSError as e:
        raise CellfuseError(f"{path}: cannot read this {what} ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CellfuseError(f"{path}: not valid TOML ({e})") from None


def read_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> tuple[dict, Origin]:
    """The recipe file (a path, or a shipped recipe's name) as parsed TOML with `--set` overrides
    applied (not yet checked), and their origin."""
    path = find_recipe(path)
    raw = read_toml(path)
    file_keys = frozenset(_key_paths(raw))
    written = tuple((apply_override(raw, item), item) for item in overrides)
    return raw, Origin(path, written, file_keys)


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Parse a recipe file, apply `key=value` overrides, check every key, type and value."""
    raw, origin = read_recipe(path, overrides)
    return build_recipe(raw, origin.path, origin)


def build_recipe(raw: dict, path: Path, origin: Origin | None = None) -> Recipe:
    """A parsed recipe (with any overrides applied) -> Recipe, every key, type and value checked."""
    origin = origin or Origin(Path(path))
    raw = dict(raw)
    name = _check_name(raw.pop("name", None), Path(path), origin)
    _refuse_unknown(raw, list(TOP_KEYS), "", origin)
    sections = {key: _section(cls, raw.get(key, {}), key, origin) for key, cls in SECTIONS.items()
                if key in raw or key != "distill"}
    augment = _augment(raw.get("augment", {}), origin)
    recipe = Recipe(name=name, path=str(path), augment=augment, **sections)
    _check_monitor(recipe, origin)
    if recipe.train.consistency > 0 and not recipe.augment["augmix"]:
        raise CellfuseError(f"{origin.path}: train.consistency = {recipe.train.consistency} compares AugMix "
                            "views; add [augment] augmix = true (or set consistency = 0)")
    return recipe


def seeded(paths, overrides, seeds=()) -> list[tuple[Path, list[str]]]:
    """(recipe path, overrides) for each recipe as written, or, given seeds, once per seed: train.seed set
    and the run named <name>-seed<S>. Two training draws of one recipe differ by more than most levers
    (docs/results.md), so a recipe is judged by its spread over seeds, not by one run."""
    if not seeds:
        return [(Path(p), list(overrides)) for p in paths]
    if any(item.partition("=")[0].strip() == "train.seed" for item in overrides):
        raise CellfuseError("--seeds sets train.seed for each run; drop --set train.seed=...")
    jobs = []
    for path in paths:
        name = load_recipe(path, overrides).name
        jobs += [(Path(path), [*overrides, f"train.seed={seed}", f"name={toml_string(f'{name}-seed{seed}')}"])
                 for seed in seeds]
    return jobs


def monitored_set(recipe: Recipe) -> str | None:
    """The extra_val set whose accuracy picks the checkpoint (train.monitor = "<name>_accuracy"), if any."""
    monitor = recipe.train.monitor
    name = monitor.removesuffix("_accuracy")
    return name if monitor.endswith("_accuracy") and name in extra_val_names(recipe) else None


def extra_val_names(recipe: Recipe) -> list[str]:
    """Each extra_val file's name in the validation tables and logs: its stem (val_heldout.npz -> val_heldout)."""
    return [Path(path).stem for path in recipe.data.extra_val]


def _check_monitor(recipe: Recipe, origin: Origin) -> None:
    allowed = ["val_auc", "val_accuracy", *(f"{name}_accuracy" for name in extra_val_names(recipe))]
    if recipe.train.monitor not in allowed:
        raise CellfuseError(f"{origin.of('train.monitor')}: train.monitor = {recipe.train.monitor!r}; choose one of "
                            f"{allowed} (an extra validation set's accuracy needs the file in data.extra_val)")


def check_student(recipe: Recipe) -> None:
    """Refuse what distillation cannot honour (a recipe fine for `train` may not be for `distill`)."""
    path, cfg = recipe.path, recipe.distill
    if cfg is None:
        raise CellfuseError(f"{path}: a student recipe needs a [distill] section; add one, or give it with "
                            "--set distill.mode=cached (or bank, function-matching), or use a shipped student "
                            "such as student-cpu-lite0")
    if recipe.train.class_weights != "none":  # the targets are the teacher's soft votes, not classes
        raise CellfuseError(f"{path}: train.class_weights = {recipe.train.class_weights!r} does not apply "
                            "to distillation (the student matches the teacher's probabilities, not labels "
                            "alone); remove it from the student recipe")
    if cfg.mode == "bank" and recipe.train.consistency:
        raise CellfuseError(f"{path}: train.consistency needs three views of each image per step, and a "
                            "bank row holds one; use mode = \"function-matching\" or \"cached\"")


def _check_name(name, path: Path, origin: Origin) -> str:
    if name is None:
        name, whence = path.stem, " (the recipe file's name; set name = \"...\" in it)"
    else:
        whence = ""
    if type(name) is int:  # `name = 2024` in a file is a number
        name = str(name)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise CellfuseError(f"{origin.of('name')}: name = {name!r}{whence}: must be one plain folder name "
                            "(letters, digits, '.', '_', '-', not starting with '.'), as it names the run's folder")
    return name


def _section(cls, values, table: str, origin: Origin):
    if not isinstance(values, dict):
        raise CellfuseError(f"{origin.of(table)}: [{table}] must be a table, got {values!r}")
    _refuse_unknown(values, [f.name for f in dataclasses.fields(cls)], table, origin)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        key = f"{table}.{k}"
        kwargs[k] = _check_rule(key, _coerce(v, hints[k], key, origin), origin.of(key))
    return cls(**kwargs)


def _augment(values, origin: Origin) -> dict:
    if isinstance(values, dict):
        _refuse_unknown(values, list(AUGMENT_DEFAULTS), "augment", origin)
    return check_section(values, f"{origin.of_table('augment')} [augment]")


def _refuse_unknown(values: dict, known: list[str], table: str, origin: Origin) -> None:
    """Unknown keys are errors, with a did-you-mean; one origin at a time, so the right one is blamed."""
    unknown = sorted(set(values) - set(known))
    if not unknown:
        return
    where = origin.of(_join(table, unknown[0]))
    unknown = [k for k in unknown if origin.of(_join(table, k)) == where]
    shortcuts = SHORTCUTS.get(table, {})
    hint = ("; epochs are per stage (train.stages), and --set train.epochs=N sets the last stage's"
            if table == "train" and "epochs" in unknown else "")
    what = f"key(s) {unknown} in [{table}]" if table else f"section(s) {unknown}"
    raise CellfuseError(f"{where}: unknown {what}{_did_you_mean(unknown, [*known, *shortcuts])}; "
                        f"known: {', '.join([*known, *shortcuts.values()])}{hint}")


def _did_you_mean(unknown: list[str], known: list[str]) -> str:
    guesses = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
    found = [f"{m[0]!r}" + (f" for {k!r}" if len(unknown) > 1 else "") for k, m in guesses.items() if m]
    return f" (did you mean {', '.join(found)}?)" if found else ""


def _join(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


def _coerce(value, hint, key: str, origin: Origin):
    """Check a TOML value against a dataclass field's type; ints widen to floats, lists to tuples."""
    where = f"{origin.of(key)}: {key}"
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and type(value) is not bool:
        raise CellfuseError(f"{where} must be true or false (lower case, as TOML writes them), got {value!r}")
    if hint in (int, str, bool, float):
        if type(value) is not hint:
            raise CellfuseError(f"{where} must be {hint.__name__}, got {value!r}")
        if hint is float and not math.isfinite(value):
            raise CellfuseError(f"{where} must be a finite number, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise CellfuseError(f"{where} must be a list, got {value!r}")
        item = typing.get_args(hint)[0]
        if item is Stage:
            if not value:
                raise CellfuseError(f"{where} = []: needs at least one stage")
            return tuple(_section(Stage, v, f"{key}[{i}]", origin) for i, v in enumerate(value))
        return tuple(_coerce(v, item, key, origin) for v in value)
    raise CellfuseError(f"{where}: unsupported type {hint}")


# ---------------------------------------------------------------- overrides: one key-path grammar

_SEGMENT = r"([A-Za-z_]\w*)(?:\[(\d+)\])?"
KEY_PATH = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
EXAMPLE_KEYS = '"train.label_smoothing" or "train.stages[1].lr"'


def key_segments(key: str, where: str) -> list[tuple[str, int | None]]:
    """`train.stages[1].lr` -> [("train", None), ("stages", 1), ("lr", None)]."""
    if not isinstance(key, str) or not KEY_PATH.fullmatch(key):
        raise CellfuseError(f"{where}: not a recipe key like {EXAMPLE_KEYS}")
    return [(m.group(1), None if m.group(2) is None else int(m.group(2))) for m in re.finditer(_SEGMENT, key)]


def get_key(tree: dict, key: str, where: str):
    """The value at `key` in a recipe as a dict (as_dict): an unknown key or a missing entry is an error."""
    node, at = tree, ""
    for name, index in key_segments(key, where):
        if not isinstance(node, dict) or name not in node:
            known = list(node) if isinstance(node, dict) else []
            raise CellfuseError(f"{where}: unknown key {name!r} in [{at or 'recipe'}]"
                                f"{_did_you_mean([name], known)}; known: {', '.join(known) or 'nothing (not a table)'}")
        node, at = node[name], _join(at, name)
        if index is not None:
            node, at = _entry(node, index, at, where), f"{at}[{index}]"
    return node


def set_key(raw: dict, key: str, value, where: str) -> None:
    """Write `value` at `key` in a parsed recipe. A list the file leaves to its default (the stages) is
    copied in first, so `train.stages[1].lr` changes one entry of the written or the default list."""
    segments = key_segments(key, where)
    node, at = raw, ""
    for depth, (name, index) in enumerate(segments):
        last = depth == len(segments) - 1
        if not isinstance(node, dict):
            raise CellfuseError(f"{where}: [{at}] is not a table")
        at = _join(at, name)
        if index is None:
            if last:
                node[name] = value
                return
            node = node.setdefault(name, {})
            continue
        if name not in node:
            node[name] = _plain(_default(at))
        _entry(node[name], index, at, where)
        if last:
            node[name][index] = value
            return
        node, at = node[name][index], f"{at}[{index}]"


def _entry(node, index: int, at: str, where: str):
    if not isinstance(node, (list, tuple)) or index >= len(node):
        size = len(node) if isinstance(node, (list, tuple)) else "no"
        raise CellfuseError(f"{where}: {at} has {size} entries (index from 0)")
    return node[index]


def _default(at: str):
    """The default value at a key path (indices dropped), or None for a key without one."""
    node = as_dict(Recipe(name="", path="", augment=dict(AUGMENT_DEFAULTS), distill=DistillConfig()))
    for name in re.sub(r"\[\d+\]", "", at).split("."):
        node = node.get(name) if isinstance(node, dict) else None
    return node


def _plain(value):
    """Tuples as lists, recursively: a value as parsed TOML holds it, so entries can be set."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def apply_override(raw: dict, item: str) -> str:
    """One `--set key=value`, the value parsed as TOML (3, 1e-3, true, "x", [..]), else kept as a string.
    Returns the key path written, so a message about that value can blame this `--set`."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
        raise CellfuseError(f"--set {item}: expected key=value, e.g. train.batch_size=32 or 'train.stages[1].lr=1e-4'")
    value = _parse_value(text)
    if _is_text_key(key) and not isinstance(value, str):  # name=2024-01-01 is a folder name, not a date
        value = text.strip()
    if key == "train.epochs":
        return set_last_stage_epochs(raw, value, item)
    segments = key_segments(key, f"--set {item}")
    if len(segments) == 1 and key != "name":
        homes = [f"{s}.{key}" for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        raise CellfuseError(f"--set {item}: expected section.key=value" +
                            (f"; did you mean {' or '.join(homes)}?" if homes else ", e.g. train.batch_size=32"))
    set_key(raw, key, value, f"--set {item}")
    return key


def toml_string(text: str) -> str:
    """`text` as a TOML basic string, for a --set value written by code: a path with a backslash, a quote
    or \\u in it reaches the recipe unchanged."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")  # JSON's escapes are TOML's


def _is_text_key(key: str) -> bool:
    """The key holds a string (a name, a path, a choice), so its value is never read as a number or date."""
    section, _, name = key.partition(".")
    if not name:
        return key == "name"
    cls = SECTIONS.get(section)
    return cls is not None and any(f.name == name and f.type == "str" for f in dataclasses.fields(cls))


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_last_stage_epochs(raw: dict, epochs, item: str) -> str:
    """`--set train.epochs=N`: the last stage trains N epochs; earlier stages (a head warm-up) stay."""
    if type(epochs) is not int or epochs < 1:
        raise CellfuseError(f"--set {item}: expected a whole number of epochs, at least 1")
    train = raw.setdefault("train", {})
    stages = train.get("stages", _plain(_default("train.stages"))) if isinstance(train, dict) else None
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise CellfuseError(f"--set {item}: cannot set the last stage's epochs: train.stages is not a list of tables")
    train["stages"] = [*stages[:-1], {**stages[-1], "epochs": epochs}]
    return f"train.stages[{len(stages) - 1}].epochs"


def check_distinct_names(recipes: list[Recipe]) -> None:
    """Two recipes with one name would train into one run directory."""
    seen = {}
    for r in recipes:
        if r.name in seen:
            raise CellfuseError(f"{seen[r.name]} and {r.path} both name their run {r.name!r}; "
                                "give one a different `name` (or --set name=...)")
        seen[r.name] = r.path


def as_dict(recipe: Recipe) -> dict:
    out = {"name": recipe.name}
    for key in SECTIONS:
        section = getattr(recipe, key)
        if section is not None:
            out[key] = dataclasses.asdict(section)
    out["augment"] = recipe.augment
    return out
