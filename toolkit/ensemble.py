"""`cellfuse ensemble`: temperature-scaled, TTA-averaged soft voting, selected on validation data.

Candidates are (member, view set) pairs: a member's probabilities merged over the views of a set,
then divided by a temperature fitted on the steering validation set (Guo et al. 2017). Greedy
forward selection with replacement (Caruana et al. 2004) picks candidates; how often each was
picked is its weight.

Selection maximises accuracy, the challenge's metric, and breaks ties by NLL: between
correlated candidates accuracy often ties, and NLL then prefers confidence where the vote is
right. Minimising NLL alone was tried: on synthetic predictions it kept junk views out better
(accuracy gave them up to ~40% of the weight) but held-out accuracy was no better, and on small
CPU members it left the ensemble below its best member on the corrupted set it was chosen on.

Selecting on the same images that are reported flatters the selection, so the table also shows
a two-fold cross-fitted estimate: temperatures and weights fitted on one half, scored on the other.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from toolkit.data import load_dataset, save_npz
from toolkit.errors import CellfuseError
from toolkit.report import (
    EPS,
    classification_metrics,
    expected_calibration_error,
    metrics_table,
    model_names,
    nll,
    paired_comparison,
    two_folds,
)
from toolkit.runs import (
    MANIFEST,
    TMP_PREFIX,
    check_compatible,
    check_replaceable,
    clear_own,
    fresh_dir,
    load_model,
    lock_output,
    refuse_inputs_inside,
    remove_own_file,
    save_model_atomic,
    write_json,
)
from toolkit.tta import merge, parse_tta, predict_views, view_layer

CACHE = "predictions.npz"
SPOT_CHECK, MODEL_TOLERANCE = 16, 1e-4  # images on which a saved ensemble must reproduce its cached predictions
TEMPERATURE_BOUNDS = (0.05, 20.0)


@dataclass(frozen=True)
class Candidate:
    member: str  # member name (unique)
    views: str  # the TTA spec, e.g. "d4" or "d4:geometric"
    view_list: tuple[str, ...]
    merge: str


# ---------------------------------------------------------------- selection maths (pure numpy)


def _log_probs(logits_or_probs) -> np.ndarray:
    """Log-probabilities from probabilities, or logits unchanged (softmax ignores the offset)."""
    z = np.asarray(logits_or_probs, dtype=np.float64)
    looks_like_probs = z.min() >= 0 and np.allclose(z.sum(-1), 1.0, atol=1e-3)
    return np.log(np.maximum(z, EPS)) if looks_like_probs else z


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T), as toolkit.layers.TemperatureScale computes it."""
    from scipy.special import softmax

    return softmax(_log_probs(probs) / temperature, axis=-1)


def fit_temperature(logits_or_probs, labels) -> float:
    """The T > 0 minimising validation NLL of softmax(z / T) (searched on a log scale)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    z, labels = _log_probs(logits_or_probs), np.asarray(labels)
    rows = np.arange(len(labels))

    def nll_at(log_t: float) -> float:  # report.nll on probabilities, here on logits at T = exp(log_t)
        return float(-log_softmax(z / np.exp(log_t), axis=-1)[rows, labels].mean())

    lo, hi = np.log(TEMPERATURE_BOUNDS)
    return float(np.exp(minimize_scalar(nll_at, bounds=(lo, hi), method="bounded").x))


def _score(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """What selection maximises, compared as a tuple: accuracy, then minus the NLL."""
    return _accuracy(labels, probs), -nll(labels, probs)


def _accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(-1) == labels).mean())


def greedy_select(candidate_probs, labels, rounds: int = 10) -> np.ndarray:
    """Caruana's greedy forward selection with replacement; returns weights (K,) summing to 1.

    Round 1 takes the best single candidate; each later round adds the candidate (again, if
    need be) whose addition scores best. The result is the best ensemble seen over all rounds,
    so on these data it never scores below the best single candidate.
    """
    probs = np.asarray(candidate_probs, dtype=np.float64)
    labels = np.asarray(labels)
    counts = np.zeros(len(probs), dtype=np.int64)
    total = np.zeros(probs.shape[1:])
    best_score, best_counts = None, counts
    for size in range(1, max(int(rounds), 1) + 1):
        scores = [_score(labels, (total + p) / size) for p in probs]
        pick = max(range(len(probs)), key=scores.__getitem__)  # first of equals: stable
        counts[pick] += 1
        total += probs[pick]
        if best_score is None or scores[pick] > best_score:
            best_score, best_counts = scores[pick], counts.copy()
    return best_counts / best_counts.sum()


def _fit(candidate_probs: np.ndarray, labels: np.ndarray, rounds: int):
    """Temperatures (one per candidate) and weights fitted on one set of predictions."""
    temperatures = np.array([fit_temperature(p, labels) for p in candidate_probs])
    scaled = _scaled(candidate_probs, temperatures)
    return temperatures, greedy_select(scaled, labels, rounds), scaled


def _scaled(candidate_probs: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    return np.stack([temperature_scale(p, t) for p, t in zip(candidate_probs, temperatures, strict=True)])


def _cross_fitted(candidate_probs: np.ndarray, labels: np.ndarray, rounds: int, seed: int = 0):
    """Out-of-fold probabilities of (best single candidate, ensemble), two folds each way."""
    single, ensemble = np.zeros(candidate_probs.shape[1:]), np.zeros(candidate_probs.shape[1:])
    for fit_rows, score_rows in two_folds(labels, seed):
        temperatures, weights, scaled = _fit(candidate_probs[:, fit_rows], labels[fit_rows], rounds)
        best = max(range(len(scaled)), key=lambda k: _score(labels[fit_rows], scaled[k]))
        held_out = _scaled(candidate_probs[:, score_rows], temperatures)
        single[score_rows] = held_out[best]
        ensemble[score_rows] = np.tensordot(weights, held_out, axes=1)
    return single, ensemble


# ---------------------------------------------------------------- members, views, cache


def _members(runs) -> dict[str, Path]:
    """Unique display names -> model files, named as every table names models (report.model_names)."""
    if not runs:
        raise CellfuseError("an ensemble needs at least one run or model file")
    members = model_names(runs)
    seen = set()
    for run, file in zip(runs, members.values(), strict=True):  # model_names keeps the given order
        if file.resolve() in seen:
            raise CellfuseError(f"{run}: given twice (the selection already weighs repeats)")
        seen.add(file.resolve())
    return members


def _view_sets(spec: str) -> dict[str, tuple[list[str], str]]:
    """Comma-separated TTA specs -> {spec: (views, merge)}, always with "none" (no TTA) first."""
    specs = ["none"] + [s.strip() for s in str(spec).split(",") if s.strip() and s.strip() != "none"]
    return {s: parse_tta(s) for s in dict.fromkeys(specs)}


def content_key(path) -> str:
    """The sha1 of a file's bytes: what predictions cached from a model, or on a data file, are keyed by
    (here and in distill). Contents, not path and modification time: a moved, copied or touched file
    keeps its cached predictions, a retrained or edited one never reuses them. Hashing costs about
    0.5 s per 100 MB on 2 cores, once per process for each version of a file. A folder of class
    sub-folders is keyed by its files' names within it and their contents."""
    path = Path(path).resolve()
    if path.is_dir():  # hashed once per version of its files (a key is asked for per member and view)
        stats = ((f, f.stat()) for f in sorted(path.rglob("*")) if f.is_file())
        return _folder_sha1(str(path), tuple((f.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns)
                                             for f, st in stats))
    stat = path.stat()
    return _sha1(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha1(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


@functools.lru_cache(maxsize=16)
def _folder_sha1(root: str, files: tuple) -> str:
    """Each file's name within the folder and the sha1 of its bytes, hashed together; `files` holds
    (name, size, mtime) so that an edited file makes a new key."""
    digest = hashlib.sha1()
    for name, _, _ in files:
        with open(Path(root) / name, "rb") as f:
            digest.update(f"{name}\0{hashlib.file_digest(f, 'sha1').hexdigest()}\n".encode())
    return digest.hexdigest()


def _cache_key(member_file: Path, data_path: str, view: str) -> str:
    text = json.dumps([content_key(member_file), content_key(data_path), view])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception:  # a damaged cache only costs recomputation
        return {}


def _predict_all(members, views, datasets, out: Path, console) -> dict[tuple, np.ndarray]:
    """{(member, data path, view): (n, C) probabilities}, each computed once and cached in `out`.

    The cache is keyed by the files' contents (content_key), so a retrained member or an edited data
    file is predicted afresh while everything unchanged is reused.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    cache = _read_cache(out / CACHE)
    keys = {(m, d.path, v): _cache_key(f, d.path, v) for m, f in members.items() for d in datasets
            for v in views}
    missing = [k for k, key in keys.items() if key not in cache]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("member x view predictions", total=len(keys),
                                 completed=len(keys) - len(missing))
        for name, file in members.items():
            todo = {d.path: [v for v in views if (name, d.path, v) in missing] for d in datasets}
            if not any(todo.values()):
                continue
            model = load_model(file)
            for dataset in datasets:
                if not todo[dataset.path]:
                    continue
                check_compatible(model, dataset, file)
                progress.update(task, description=f"{name} on {Path(dataset.path).name}")
                probs = predict_views(model, dataset.images, todo[dataset.path],
                                      progress=lambda units: progress.advance(task, units))
                for view, p in zip(todo[dataset.path], probs, strict=True):
                    cache[keys[name, dataset.path, view]] = p
            save_npz(out / CACHE, **cache)  # after each member: an interruption loses one at most
    return {k: cache[key] for k, key in keys.items()}


# ---------------------------------------------------------------- the single-file model


def _ensemble_model(selected: list[dict], member_files: dict[str, Path]):
    """One Keras model: each member on each view it needs once, merged, tempered, weighted."""
    import keras

    # loads TensorFlow: `cellfuse runs` (compare.py) imports this module and must not
    import toolkit.layers as layers

    models = {}
    for i, name in enumerate(dict.fromkeys(c["member"] for c in selected)):
        models[name] = load_model(member_files[name])
        models[name].name = f"member_{i}"  # members may share a name; a Functional model refuses that
    inputs = keras.Input(next(iter(models.values())).input_shape[1:], name="images")
    viewed, outputs = {}, {}

    def member_view(member: str, view: str):
        if view not in viewed:
            viewed[view] = inputs if view == "id" else view_layer(view)(inputs)
        if (member, view) not in outputs:
            outputs[member, view] = models[member](viewed[view])
        return outputs[member, view]

    votes = []
    for i, c in enumerate(selected):
        probs = [member_view(c["member"], v) for v in c["view_list"]]
        if len(probs) > 1:
            probs = [layers.MergeViews(c["merge"], name=f"merge_{i}")(probs)]
        votes.append(layers.TemperatureScale(c["temperature"], name=f"temperature_{i}")(probs[0]))
    vote = layers.WeightedSum([c["weight"] for c in selected], name="vote")(votes)
    return keras.Model(inputs, vote, name="cellfuse_ensemble")


def load_ensemble(dir, *, views: bool = True):
    """The single-file ensemble model written by `build_ensemble`.

    `views=False` rebuilds it from ensemble.json with every member on the input alone: the same members
    and weights at a fraction of the cost (a function-matching teacher runs every step), each member with
    the temperature fitted to its single-view predictions (the TTA-averaged ones are fitted to sharper or
    softer inputs).
    """
    file = Path(dir) / "ensemble.keras"
    if not file.is_file():
        raise CellfuseError(f"{dir}: no ensemble.keras here (run `cellfuse ensemble ... --out {dir}`)")
    if views:
        return load_model(file)
    components = teacher_components(dir, views=False)
    return _ensemble_model(components, {c["member"]: resolve_member(dir, c["member_file"]) for c in components})


def teacher_components(dir, *, views: bool = True) -> list[dict]:
    """The components load_ensemble(dir, views=) computes: as selected, or each member on the input alone."""
    if views:
        return ensemble_components(dir)
    single = _read_ensemble_json(dir).get("single_view_temperatures", {})
    return [{**c, "view_list": ["id"], "temperature": single.get(c["member"], c["temperature"])}
            for c in ensemble_components(dir)]


def cached_predictions(dir, data, components: list[dict]) -> np.ndarray | None:
    """What `components` (dicts of member_file, view_list, merge, weight and temperature or None, as
    ensemble.json holds them) predict on `data`, from the predictions the ensemble in `dir` was selected
    with: its model's figures without running it (a teacher with views on three validation sets costs
    minutes on a CPU). None unless one of its validation files holds exactly `data`'s images and labels
    and every (member, view) there is cached."""
    path = _validation_file_holding(dir, data)
    if path is None:
        return None
    cache = _read_cache(Path(dir) / CACHE)
    votes = []
    try:
        for c in components:
            key = functools.partial(_cache_key, resolve_member(dir, c["member_file"]), path)
            vote = merge(np.stack([cache[key(view)] for view in c["view_list"]]), c["merge"])
            if c.get("temperature") is not None:
                vote = temperature_scale(vote, c["temperature"])
            votes.append(c["weight"] * vote)
    except (KeyError, CellfuseError, OSError):  # not cached, or a member moved: the caller predicts
        return None
    return np.sum(votes, axis=0).astype(np.float32)


def saved_model_predictions(dir, data, model) -> np.ndarray | None:
    """What `model`, the ensemble.keras in `dir`, predicts on `data`, read from the cache (cached_predictions
    of its components with their views) where the file is still the one this ensemble.json was written
    with and reproduces the cache on `data`'s first images, as a fresh save must (_save_model). None for
    a replaced or edited model or members, an ensemble from before the check, or data it was not
    selected on."""
    try:
        if _read_ensemble_json(dir).get("model_sha1") != content_key(Path(dir) / "ensemble.keras"):
            return None
        probs = cached_predictions(dir, data, teacher_components(dir))
    except (CellfuseError, OSError, TypeError, ValueError, AttributeError):  # an ensemble.json edited by hand
        return None
    if probs is None or probs.shape != (len(data.images), data.n_classes):
        return None
    return probs if _deviation(model, data.images[:SPOT_CHECK], probs[:SPOT_CHECK]) <= MODEL_TOLERANCE else None


def _validation_file_holding(dir, data) -> str | None:
    """The validation file, of those the ensemble was built on, that holds `data` row for row (a split's
    validation rows and the val.npz `cellfuse split` wrote from them are the same images): by the path
    recorded, which is relative to where the ensemble was built, or `data`'s own file where its contents
    are one of them (a copy, or the same file named from another working folder)."""
    try:
        paths = list(json.loads((Path(dir) / "metrics.json").read_text()).get("ensemble_metrics", {}))
        recorded = _read_ensemble_json(dir).get("val_sha1", [])
    except (OSError, ValueError, CellfuseError):
        return None
    own = Path(data.path)
    if own.exists() and isinstance(recorded, list) and content_key(own) in recorded:
        paths.insert(0, str(own))
    for path in paths:
        if not Path(path).exists():  # recorded relative to where the ensemble was built
            continue
        stat = Path(path).stat()
        try:
            labels, images = _labels_and_images(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        except CellfuseError:
            continue
        if np.array_equal(labels, data.labels) and np.array_equal(images, data.images):
            return path
    return None


@functools.lru_cache(maxsize=4)
def _labels_and_images(path: str, size: int, mtime_ns: int):
    """A validation file's rows, read once per version of it: a comparison asks for each model and set."""
    held = load_dataset(path)
    return held.labels, held.images


def _read_ensemble_json(dir) -> dict:
    file = Path(dir) / "ensemble.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CellfuseError(f"{file}: cannot read the ensemble's description ({e})") from None


def ensemble_components(dir) -> list[dict]:
    """The selected (member, views) components of ensemble.json, heaviest first."""
    info = _read_ensemble_json(dir)
    if "components" not in info:
        raise CellfuseError(f"{Path(dir) / 'ensemble.json'}: no components (not an ensemble's description)")
    return sorted(info["components"], key=lambda c: -c["weight"])


def heaviest_views(dir) -> dict:
    """The view set that carries most of the ensemble's weight, summed over its components (one member
    single-view 0.4 and with D4 0.2 + 0.4 is a D4 ensemble; a tie goes to more views): {views, view_list,
    merge}. A student or a single member is compared, and submitted, with it."""
    totals = {}
    for c in ensemble_components(dir):
        key = (c["views"], tuple(c["view_list"]), c["merge"])
        totals[key] = totals.get(key, 0.0) + c["weight"]
    views, view_list, merge = max(totals, key=lambda k: (round(totals[k], 6), len(k[1])))
    return {"views": views, "view_list": list(view_list), "merge": merge}


def ensemble_split(dir) -> np.ndarray | None:
    """The validation rows every member held out (None for ensembles of files without run folders)."""
    rows = _read_ensemble_json(dir).get("val_index")
    return None if rows is None else np.asarray(rows, dtype=np.int64)


def _ensemble_metrics(dir, *keys: str) -> dict:
    """The ensemble's metrics.json, refused with one line unless it holds `keys`."""
    file = Path(dir) / "metrics.json"
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CellfuseError(f"{file}: cannot read the ensemble's members ({e})") from None
    missing = [key for key in keys if key not in info]
    if missing:
        raise CellfuseError(f"{file}: no {', '.join(missing)} (written by an older cellfuse? run `cellfuse ensemble` again)")
    return info


def ranked_members(dir) -> list[str]:
    """The ensemble's members, the most accurate alone (as saved, on the steering data) first."""
    info = _ensemble_metrics(dir, "members", "rows", "steering_data")
    return sorted(info["members"], key=lambda m: -info["rows"][f"{m} as saved"][info["steering_data"]]["accuracy"])


def member_file(dir, name: str) -> Path:
    """A member's model file: by name, or "best-member" (most accurate alone on the steering data)."""
    info = _ensemble_metrics(dir, "members")
    members = info["members"]
    if name == "best-member":
        if "best_member" not in info:
            raise CellfuseError(f"{dir}: metrics.json names no best member; rebuild it with cellfuse ensemble")
        name = info["best_member"]
    if name not in members:
        raise CellfuseError(f"{dir}: no member named {name!r}; members are {', '.join(members)} "
                            "(or say \"best-member\")")
    return resolve_member(dir, members[name])


# ---------------------------------------------------------------- the command


def _prepare_out(out: Path, force: bool, inputs) -> Path:
    """The output directory; its cached predictions survive --force, earlier results do not.
    Only an ensemble folder cellfuse made, holding nothing else, is ever written into again."""
    out = Path(out)
    if out.is_symlink() or not out.is_dir() or not any(out.iterdir()):
        return fresh_dir(out, inputs=inputs, kind="ensemble")
    lock_output(out)
    refuse_inputs_inside(out, inputs)
    check_replaceable(out, "ensemble")  # a user's predictions.npz is never taken for a cache
    others = sorted(p.name for p in out.iterdir() if p.name not in (CACHE, MANIFEST)
                    and not p.name.startswith(TMP_PREFIX))
    if others and not force:
        raise CellfuseError(f"{out}: already holds {', '.join(others)}; pass --force to "
                            "replace the ensemble (its cached predictions are reused)")
    clear_own(out, keep=(CACHE,))
    return out


# ---------------------------------------------------------------- one validation split for all


def member_split(file: Path) -> np.ndarray | None:
    """The original row indices a member held out for validation (its run's probs_val.npz), if known."""
    probs = Path(file).parent / "probs_val.npz"
    if not probs.is_file():
        return None
    try:
        with np.load(probs, allow_pickle=False) as npz:
            return np.sort(npz["index"]) if "index" in npz.files else None
    except (OSError, ValueError) as e:
        raise CellfuseError(f"{probs}: cannot read the member's validation split ({e})") from None


def refuse_training_files(members: dict[str, Path], datasets) -> None:
    """A --val file that is a member's own training file (its run's data.train, however named or copied)
    would score members on images they learned, and steer the selection by them; files with original
    indices are also checked row by row (check_same_split)."""
    import tomllib

    for name, file in members.items():
        recipe = Path(file).parent / "recipe.toml"
        try:
            train = Path(tomllib.loads(recipe.read_text())["data"]["train"])
        except (OSError, ValueError, KeyError, TypeError):  # not a run's model: nothing to compare
            continue
        for dataset in datasets:
            val = Path(dataset.path)
            if train.is_file() and val.is_file() and (train.resolve() == val.resolve() or (
                    train.stat().st_size == val.stat().st_size and content_key(train) == content_key(val))):
                raise CellfuseError(f"{val}: is member {name}'s training file (data.train in {recipe}), so it "
                                    "cannot validate it; give the split it held out (`cellfuse split`)")


def check_same_split(members: dict[str, Path], datasets) -> np.ndarray | None:
    """Every member held out the same rows, and every --val file that carries original indices lies
    inside them: otherwise a member trained on "validation" images and every figure is flattered."""
    splits = {name: member_split(file) for name, file in members.items()}
    known = {name: rows for name, rows in splits.items() if rows is not None}
    if not known:
        return None
    first, rows = next(iter(known.items()))
    for name, other in known.items():
        if not np.array_equal(other, rows):
            leaked = len(np.setdiff1d(rows, other))
            raise CellfuseError(f"members {first} and {name} used different validation splits ({leaked} of "
                                f"{first}'s {len(rows)} validation rows were training rows for {name}); "
                                "train every member with the same data.train, data.val_fraction and "
                                "data.split_seed")
    for dataset in datasets:
        if dataset.has_index:
            outside = np.setdiff1d(dataset.index, rows)
            if len(outside):
                raise CellfuseError(f"{dataset.path}: {len(outside)} of its {len(dataset)} rows were training "
                                    f"rows for the members ({first}, ...), so it cannot validate them; write "
                                    "it with `cellfuse split` using the members' val_fraction and split_seed")
    return rows


def build_ensemble(runs, val_data, out, *, views="d4", rounds=10, force=False, console=None) -> dict:
    """Predict, calibrate, select, save and report; see the module docstring. Returns the figures."""
    from rich.console import Console

    console = console or Console()
    if not val_data:
        raise CellfuseError("give at least one --val data file")
    if rounds < 1:
        raise CellfuseError(f"--rounds must be at least 1, got {rounds}")
    members, view_sets = _members(runs), _view_sets(views)
    datasets = [load_dataset(p) for p in val_data]
    if len({Path(d.path).resolve() for d in datasets}) < len(datasets):
        raise CellfuseError("the same --val file is given twice")
    refuse_training_files(members, datasets)  # before the folder is made: a refusal leaves nothing
    split_rows = check_same_split(members, datasets)
    out = _prepare_out(out, force, [*[members[m] for m in members], *val_data])
    all_views = list(dict.fromkeys(v for vs, _ in view_sets.values() for v in vs))
    preds = _predict_all(members, all_views, datasets, out, console)

    candidates = [Candidate(m, s, tuple(vs), how) for m in members for s, (vs, how) in view_sets.items()]
    merged = {d.path: _merged(preds, candidates, d.path) for d in datasets}
    steer = datasets[-1]
    temperatures, weights, _ = _fit(merged[steer.path], steer.labels, rounds)
    scaled = {d.path: _scaled(merged[d.path], temperatures) for d in datasets}
    ensemble = {d.path: np.tensordot(weights, scaled[d.path], axes=1) for d in datasets}
    selected = [{**asdict(c), "view_list": list(c.view_list), "member_file": _relative(members[c.member], out),
                 "temperature": float(temperatures[k]), "weight": float(weights[k])}
                for k, c in enumerate(candidates) if weights[k] > 0]
    model_error = _save_model(selected, members, out, steer.images[:SPOT_CHECK], ensemble[steer.path][:SPOT_CHECK])

    rows = _rows(candidates, datasets, merged, scaled, temperatures, weights, ensemble)
    single_cv, ensemble_cv = _cross_fitted(merged[steer.path], steer.labels, rounds)
    rows["best single, 2-fold"] = {steer.path: _brief(steer.labels, single_cv)}
    rows["ensemble, 2-fold"] = {steer.path: _brief(steer.labels, ensemble_cv)}
    best_member = max(members, key=lambda m: rows[f"{m} as saved"][steer.path]["accuracy"])
    figures = {
        "out": str(out), "steering_data": steer.path, "members": {m: _relative(f, out) for m, f in members.items()},
        "view_sets": {s: vs for s, (vs, _) in view_sets.items()}, "rounds": rounds, "selected": selected,
        "best_member": best_member,
        "best_member_accuracy": rows[f"{best_member} as saved"][steer.path]["accuracy"],
        "ensemble_accuracy": rows["ensemble"][steer.path]["accuracy"],
        "cross_fitted": {"best_single_accuracy": rows["best single, 2-fold"][steer.path]["accuracy"],
                         "ensemble_accuracy": rows["ensemble, 2-fold"][steer.path]["accuracy"],
                         "paired": paired_comparison(ensemble_cv.argmax(1) == steer.labels,
                                                     single_cv.argmax(1) == steer.labels)},
        "model_max_abs_error": model_error, "rows": rows,
    }
    write_json(out / "ensemble.json", {
        "members": [c["member"] for c in selected], "weights": [c["weight"] for c in selected],
        "temperatures": [c["temperature"] for c in selected], "views": [c["views"] for c in selected],
        "components": selected, "steering_data": steer.path, "rounds": rounds,
        # the view-free teacher (distill) runs members on one view: their single-view temperatures
        "single_view_temperatures": {c.member: float(temperatures[k]) for k, c in enumerate(candidates)
                                     if c.views == "none"},
        "val_index": None if split_rows is None else split_rows.tolist(),
        "val_sha1": [content_key(d.path) for d in datasets],  # the cache speaks for these files wherever they lie
        "model_sha1": content_key(out / "ensemble.keras")})  # and for this model
    write_json(out / "metrics.json", {**figures, "ensemble_metrics": {
        d.path: classification_metrics(d.labels, ensemble[d.path], d.class_names) for d in datasets}})
    for dataset in datasets:
        console.print(_table(rows, dataset, steering=dataset is steer))
    console.print(_selection_gain(figures["cross_fitted"], Path(steer.path).name))
    console.print(f"selected {len(selected)} of {len(candidates)} candidates; "
                  f"wrote {out / 'ensemble.keras'} and {out / 'ensemble.json'}")
    return figures


def _merged(preds: dict, candidates: list[Candidate], data_path: str) -> np.ndarray:
    """(K, n, C): each candidate's member predictions merged over its views."""
    return np.stack([merge(np.stack([preds[c.member, data_path, v] for v in c.view_list]), c.merge)
                     for c in candidates])


def _save_model(selected, members, out: Path, images, expected) -> float:
    """Write DIR/ensemble.keras and reload it as every later stage will (safe mode): return its largest
    deviation from the cached-prediction ensemble."""
    save_model_atomic(_ensemble_model(selected, members), out / "ensemble.keras")
    error = _deviation(load_model(out / "ensemble.keras"), images, expected)
    if error > MODEL_TOLERANCE:  # the saved model is not what was selected: say so loudly, and never leave it for
        remove_own_file(out / "ensemble.keras")  # export or distill to pick up (the cached predictions stay)
        raise CellfuseError(f"{out / 'ensemble.keras'}: the saved ensemble differs from the selected one by "
                            f"{error:.1e}, so it was deleted; please report this with the members' recipes")
    return error


def _deviation(model, images, expected) -> float:
    """The largest gap between `model`'s probabilities on `images` and `expected` (the cache's)."""
    # batches pulls scipy and Pillow (via corrupt): `cellfuse runs` imports this module and stays quick
    from toolkit.batches import Predictor

    return float(np.abs(Predictor(model)(images) - expected).max())


def _relative(file: Path, out: Path) -> str:
    """Member paths relative to the ensemble folder: run folders copied elsewhere together still resolve."""
    import os

    return os.path.relpath(Path(file).resolve(), Path(out).resolve())


def _readable(path: Path) -> Path:
    """The same file, read as a person would name it: ensembles/e/../../runs/m -> runs/m (under the
    working folder), else absolute."""
    path, here = path.resolve(), Path.cwd().resolve()
    return path.relative_to(here) if path.is_relative_to(here) else path


def resolve_member(dir, recorded: str) -> Path:
    """A member file named in ensemble.json: relative to the ensemble folder (or absolute, older files)."""
    path = Path(recorded)
    path = path if path.is_absolute() else _readable(Path(dir) / path)
    if not path.is_file():
        raise CellfuseError(f"{Path(dir) / 'ensemble.json'}: member file {recorded} not found (looked at "
                            f"{path}); keep run folders where they were relative to the ensemble")
    return path


def _selection_gain(cross_fitted: dict, steering: str) -> str:
    """One line: does the ensemble beat its best single candidate on images its selection did not see,
    by more than the draw of those images? (exact McNemar on the 2-fold out-of-fold predictions)"""
    paired = cross_fitted["paired"]
    verdict = "beyond chance" if paired["p"] < 0.05 else "within chance"
    return (f"2-fold cross-fitted on {steering}: ensemble {cross_fitted['ensemble_accuracy']:.3f}, best single "
            f"{cross_fitted['best_single_accuracy']:.3f} ({100 * paired['difference']:+.1f} points; "
            f"{paired['a_only']} images only the ensemble got right, {paired['b_only']} only the single; "
            f"p = {paired['p']:.2f}, {verdict})")


def _brief(labels, probs) -> dict:
    return {"accuracy": _accuracy(labels, probs), "nll": nll(labels, probs),
            "ece": expected_calibration_error(labels, probs)}


def _rows(candidates, datasets, merged, scaled, temperatures, weights, ensemble) -> dict:
    """Table rows: each member as saved, then per view set (temperature-scaled), then the ensemble."""
    rows: dict[str, dict] = {}
    for k, c in enumerate(candidates):
        if c.views == "none":
            rows[f"{c.member} as saved"] = {d.path: _brief(d.labels, merged[d.path][k]) for d in datasets}
        rows[f"{c.member} {c.views}"] = {"temperature": float(temperatures[k]), "weight": float(weights[k]),
                                         **{d.path: _brief(d.labels, scaled[d.path][k]) for d in datasets}}
    rows["ensemble"] = {"weight": 1.0, **{d.path: _brief(d.labels, ensemble[d.path]) for d in datasets}}
    return rows


def _table(rows: dict, dataset, steering: bool):
    name = Path(dataset.path).name
    title = (f"{name}: members as saved, per TTA view set (temperature-scaled), ensemble"
             + (" (steers the selection: the 2-fold rows are the fair estimate)" if steering else ""))
    table_rows = {row: {**figures[dataset.path], "T": figures.get("temperature"),
                        "weight": figures.get("weight")}
                  for row, figures in rows.items() if dataset.path in figures}
    return metrics_table(table_rows, title=title, columns=("accuracy", "nll", "ece", "T", "weight"))
