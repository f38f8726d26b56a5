"""Find and explain contamination in a training set: duplicates, label conflicts, non-cell pictures.

`clean_arrays` is the whole decision, on arrays:
1. perceptual-hash every image (imagehash.phash, packed into uint64);
2. group near duplicates: pairs within `threshold` bits found by multi-index hashing (no O(n^2)
   loop), groups = connected components of those pairs;
3. score one representative per group for oddness: distance from the dataset mean (the seed
   team's method, reported) and LocalOutlierFactor on cheap colour features (it decides);
4. judge each group: many copies across labels (or of an odd picture) -> repeated non-cell picture,
   all copies removed; disagreeing labels -> label conflict, all removed; otherwise keep the lowest
   row, the rest are exact or near duplicates of it. A lone odd picture is an outlier.
`clean_file` wraps it: load, write clean.npz / report.json / removed.png / tsne.png, print a table.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.data import (
    CLASS_NAMES,
    DEFAULT_THRESHOLD,
    hash_groups,
    load_dataset,
    phash_bits,
    save_dataset,
)
from toolkit.errors import CellfuseError
from toolkit.report import pyplot
from toolkit.runs import atomic_save_figure, fresh_dir, write_json

# A picture is odd when its LocalOutlierFactor reaches MIN_LOF: on train.npz the 22 non-cell pictures
# score 4.5 and more, the oddest real cells 2.4 and less (typical pictures ~1). A clean file loses
# nothing. The contamination fraction only caps how many go (a guard against a bad threshold).
MIN_LOF = 3.0
DEFAULT_CONTAMINATION = 0.01
# A near-duplicate group this large, spanning this many labels (or whose picture is an outlier),
# is a pasted non-cell picture rather than a cell photographed twice.
NONCELL_MIN_COPIES = 5
NONCELL_MIN_LABELS = 3
REASONS = ("repeated_noncell", "outlier", "label_conflict", "exact_duplicate", "near_duplicate")
EXPLAIN = {
    "repeated_noncell": "one picture pasted many times across labels: every copy removed",
    "outlier": f"a lone picture unlike the rest: LocalOutlierFactor on colour features >= {MIN_LOF}",
    "label_conflict": "near duplicates whose labels disagree: the whole group removed",
    "exact_duplicate": "byte-identical to an earlier row (duplicate_of)",
    "near_duplicate": "perceptual hash within the threshold of the group's kept row",
}
THUMB = 16  # side of the colour thumbnail in the cheap representation
HIST_BINS = 16  # per channel
LOF_NEIGHBOURS = 50  # above the few crops of one odd picture, so they cannot vouch for each other
LOF_DIMS = 8


# ---------------------------------------------------------------- duplicates

def first_identical(images: np.ndarray) -> np.ndarray:
    """For each row, the first row holding byte-identical pixels (itself when it is the first)."""
    digests = np.array([int.from_bytes(hashlib.blake2b(np.ascontiguousarray(x).tobytes(),
                                                       digest_size=8).digest(), "big")
                        for x in images], dtype=np.uint64)
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    return first[inverse.ravel()]


def find_duplicates(hashes: np.ndarray, threshold: int) -> list[np.ndarray]:
    """Near-duplicate groups of two or more rows (each sorted), ordered by their first row."""
    group = hash_groups(hashes, threshold)
    order = np.argsort(group, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(group[order])) + 1)
    return sorted((g for g in groups if len(g) > 1), key=lambda g: g[0])


# ---------------------------------------------------------------- odd pictures

def image_features(images: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Cheap representation: a 16x16 colour thumbnail (layout) + per-channel histograms (palette)."""
    n, h, w, _ = images.shape
    if h != w or h % 32:
        raise CellfuseError(f"image size {h}x{w}: the cleaner needs square images, sides a multiple of 32")
    parts = []
    for a in range(0, n, chunk):
        thumb32 = _shrink(images[a:a + chunk].astype(np.uint16), h // 32).astype(np.float32)
        thumb = _shrink(thumb32, 32 // THUMB) / 255
        m = len(thumb32)
        bins = (thumb32 * (HIST_BINS / 256)).astype(np.int64).clip(0, HIST_BINS - 1)
        bins += HIST_BINS * np.arange(3) + 3 * HIST_BINS * np.arange(m)[:, None, None, None]
        hist = np.bincount(bins.ravel(), minlength=3 * HIST_BINS * m).reshape(m, -1) / (32 * 32)
        parts.append(np.hstack([thumb.reshape(m, -1), hist]).astype(np.float32))
    return np.concatenate(parts)


def _shrink(x: np.ndarray, k: int) -> np.ndarray:
    """Means over k x k pixel blocks of (n, H, W, C), by strided adds (numpy's multi-axis mean
    over a reshaped view is several times slower)."""
    x = sum(x[:, :, i::k] for i in range(k))
    return sum(x[:, i::k] for i in range(k)) / (k * k)


@dataclass
class Oddness:
    flags: np.ndarray  # bool: removed as odd
    lof: np.ndarray  # LocalOutlierFactor score, higher = odder (~1 for typical points)
    mean_distance: np.ndarray  # the seed method: distance of the thumbnail from the mean thumbnail
    seed_rank: np.ndarray  # 1 = farthest from the mean
    min_lof: float = MIN_LOF


def find_outliers(features: np.ndarray, contamination: float, min_lof: float = MIN_LOF) -> Oddness:
    """Flag the pictures whose LocalOutlierFactor is at least `min_lof`, at most the `contamination`
    fraction of them (the oddest first).

    LOF on the standardised features reduced to 8 PCA dimensions compares each picture with its
    50 nearest neighbours, so odd pictures stand out even where the seed's global mean is pulled
    by them; the distance from the mean is computed too, for the report.
    """
    from sklearn.decomposition import PCA
    from sklearn.neighbors import LocalOutlierFactor
    from sklearn.preprocessing import StandardScaler

    n = len(features)
    thumbs = features[:, : THUMB * THUMB * 3]
    mean_distance = np.linalg.norm(thumbs - thumbs.mean(0), axis=1)
    seed_rank = np.empty(n, np.int64)
    seed_rank[np.argsort(-mean_distance, kind="stable")] = np.arange(1, n + 1)
    if n < 3:
        return Oddness(np.zeros(n, bool), np.ones(n), mean_distance, seed_rank, min_lof)
    with one_thread():
        z = StandardScaler().fit_transform(features)
        z = PCA(min(LOF_DIMS, n, z.shape[1]), random_state=0).fit_transform(z)
        lof = -LocalOutlierFactor(n_neighbors=min(LOF_NEIGHBOURS, n - 1)).fit(z).negative_outlier_factor_
    flags = np.zeros(n, bool)
    oddest = np.argsort(-lof, kind="stable")[: int(round(contamination * n))]
    flags[oddest[lof[oddest] >= min_lof]] = True
    return Oddness(flags, lof, mean_distance, seed_rank, min_lof)


def find_repeated_noncells(groups: list[np.ndarray], labels: np.ndarray,
                           odd_groups: np.ndarray) -> np.ndarray:
    """Which groups are a pasted non-cell picture: many copies, and spread over labels or odd.

    A real cell photographed twice makes a group of 2-3 under one label; the planted pictures come
    in hundreds under every label. Size alone would also catch a cell pasted often under its own
    label (a duplicate, not a non-cell), so spread or oddness must confirm it.
    """
    return np.array([len(g) >= NONCELL_MIN_COPIES
                     and (len(np.unique(labels[g])) >= NONCELL_MIN_LABELS or bool(odd))
                     for g, odd in zip(groups, odd_groups, strict=True)], dtype=bool)


# ---------------------------------------------------------------- the decision

@dataclass
class Cleaning:
    keep: np.ndarray  # kept rows, ascending
    removed: list[dict]  # one record per removed row, by row
    groups: list[dict]  # every near-duplicate group: rows, labels, verdict
    oddness: dict  # seed vs LOF: far end of the seed ranking and how the two agree
    threshold: int
    contamination: float
    n: int
    seconds: dict = field(default_factory=dict)

    def counts(self) -> dict:
        reasons = [r["reason"] for r in self.removed]
        return {"input": self.n, "kept": len(self.keep), "removed": len(self.removed),
                **{reason: reasons.count(reason) for reason in REASONS}}


def check_settings(threshold: int | None, contamination: float | None) -> tuple[int, float]:
    """The settings, defaults filled in, or a one-line error: checked before anything is written."""
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    contamination = DEFAULT_CONTAMINATION if contamination is None else contamination
    if not 0 <= threshold <= 32:
        raise CellfuseError(f"--threshold must be 0..32 bits of 64, got {threshold}")
    if not 0 <= contamination < 0.5:
        raise CellfuseError(f"--contamination must be in [0, 0.5), got {contamination}")
    return threshold, contamination


def clean_arrays(images: np.ndarray, labels: np.ndarray, *, threshold: int | None = None,
                 contamination: float | None = None, min_lof: float = MIN_LOF, console=None) -> Cleaning:
    """Decide, for every row, keep or remove, and why. Needs no files."""
    threshold, contamination = check_settings(threshold, contamination)
    labels = np.asarray(labels).ravel()
    seconds = {}
    with timed(seconds, "phash"):
        hashes = phash_bits(images, console)
    with timed(seconds, "near_duplicates"):
        identical = first_identical(images)
        groups = find_duplicates(hashes, threshold)
    with timed(seconds, "outliers"):
        in_group = np.zeros(len(images), bool)
        for g in groups:
            in_group[g[1:]] = True
        reps = np.flatnonzero(~in_group)  # one picture per group (its lowest row) and every single
        odd = find_outliers(image_features(images[reps]), contamination, min_lof)
    with timed(seconds, "decide"):
        odd_row = np.zeros(len(images), bool)
        odd_row[reps] = odd.flags
        noncell = find_repeated_noncells(groups, labels, odd_row[[g[0] for g in groups]])
        reason, twin, group_records = _judge_groups(images, labels, groups, noncell, identical)
        for r in reps[odd.flags]:
            reason.setdefault(int(r), "outlier")
        removed = _removal_records(labels, reason, twin, groups, reps, odd)
        keep = np.setdiff1d(np.arange(len(images)), np.fromiter(reason, np.int64, len(reason)))
    return Cleaning(keep, removed, group_records, _compare_odd_methods(reps, odd, reason),
                    threshold, contamination, len(images), seconds)


def _judge_groups(images, labels, groups, noncell, identical):
    """Reason and twin of every grouped row that goes; the lowest row of a duplicate group stays."""
    reason, twin, records = {}, {}, []
    for gid, (g, is_noncell) in enumerate(zip(groups, noncell, strict=True)):
        conflict = len(np.unique(labels[g])) > 1
        verdict = "repeated_noncell" if is_noncell else "label_conflict" if conflict else None
        records.append({"group": gid, "rows": g.tolist(), "labels": labels[g].tolist(),
                        "verdict": verdict or "duplicates"})
        if verdict:
            reason[int(g[0])] = verdict
        for r in map(int, g[1:]):
            exact = identical[r] != r and np.array_equal(images[r], images[identical[r]])
            twin[r] = int(identical[r]) if exact else int(g[0])
            reason[r] = verdict or ("exact_duplicate" if exact else "near_duplicate")
    return reason, twin, records


def _removal_records(labels, reason, twin, groups, reps, odd: Oddness) -> list[dict]:
    group_of = {int(r): gid for gid, g in enumerate(groups) for r in g}
    rep_pos = {int(r): k for k, r in enumerate(reps)}
    records = []
    for r in sorted(reason):
        record = {"row": r, "reason": reason[r], "label": int(labels[r]),
                  "class": _class_name(labels[r]), "duplicate_of": twin.get(r),
                  "group": group_of.get(r)}
        if r in rep_pos:  # scored pictures carry both oddness scores
            k = rep_pos[r]
            record.update(lof=round(float(odd.lof[k]), 3), seed_rank=int(odd.seed_rank[k]))
            if reason[r] == "outlier":
                record["why"] = f"LocalOutlierFactor {odd.lof[k]:.2f} >= {odd.min_lof}"
        records.append(record)
    return records


@contextmanager
def timed(seconds: dict, stage: str):
    start = time.perf_counter()
    yield
    seconds[stage] = round(time.perf_counter() - start, 3)


def _compare_odd_methods(reps: np.ndarray, odd: Oddness, reason: dict) -> dict:
    """The seed's far end next to what LOF flagged, so the two methods can be compared."""
    k = int(odd.flags.sum())
    far = np.argsort(odd.seed_rank)[: max(k, 30)]
    return {
        "distinct_pictures": len(reps),
        "lof_flagged": k,
        "lof_flagged_in_seed_top_k": int((odd.seed_rank[odd.flags] <= k).sum()),
        "seed_far_end": [{"row": int(reps[i]), "seed_rank": int(odd.seed_rank[i]),
                          "mean_distance": round(float(odd.mean_distance[i]), 3),
                          "lof": round(float(odd.lof[i]), 3),
                          "removed_as": reason.get(int(reps[i]))} for i in far],
    }


def _class_name(label) -> str:
    return CLASS_NAMES[int(label)] if 0 <= int(label) < len(CLASS_NAMES) else f"class {int(label)}"


# ---------------------------------------------------------------- the command

def clean_file(data, out, *, threshold=None, contamination=None, tsne=True, force=False,
               console=None) -> dict:
    """Clean DATA into OUT: clean.npz, report.json, removed.png, tsne.png; returns the counts."""
    from rich.console import Console

    console = console or Console()
    start = time.perf_counter()
    data, out = Path(data), Path(out)
    inside = out.resolve() in (data.resolve(), *data.resolve().parents)
    if inside or data.resolve() in out.resolve().parents:  # --force would delete or alter the input
        raise CellfuseError(f"{out}: the output directory would contain the input {data} "
                            "(or lie inside it); choose another --out")
    check_settings(threshold, contamination)  # before fresh_dir empties a folder --force replaces
    seconds = {}
    with timed(seconds, "load"):
        ds = load_dataset(data)
    out = fresh_dir(out, force, inputs=[data], kind="clean")
    result = clean_arrays(ds.images, ds.labels, threshold=threshold, contamination=contamination,
                          console=console)
    seconds.update(result.seconds)
    with timed(seconds, "write_npz"):
        save_dataset(out / "clean.npz", ds.images[result.keep], ds.labels[result.keep],
                     index=result.keep)
    with timed(seconds, "removed_png"):
        plot_removed(ds.images, result.removed, out / "removed.png")
    if tsne:
        with console.status("t-SNE"), timed(seconds, "tsne"):
            plot_tsne(ds.images, ds.labels, result.removed, out / "tsne.png")
    summary = {**result.counts(), "seconds": round(time.perf_counter() - start, 2)}
    write_json(out / "report.json", {
        "input": str(data), "output": str(out / "clean.npz"), "counts": summary,
        "threshold": result.threshold, "contamination": result.contamination,
        "stage_seconds": seconds, "reasons": EXPLAIN,
        "removed": result.removed,
        "conflict_groups": [g for g in result.groups if g["verdict"] == "label_conflict"],
        "noncell_groups": [_noncell_summary(g) for g in result.groups
                           if g["verdict"] == "repeated_noncell"],
        "duplicate_groups": [g for g in result.groups if g["verdict"] == "duplicates"],
        "odd_pictures": result.oddness,
    })
    console.print(summary_table(summary, data))
    console.print(f"wrote {out}/clean.npz ({summary['kept']} images), report.json, removed.png"
                  + (", tsne.png" if tsne else "") + f" in {summary['seconds']:.1f}s", highlight=False)
    return summary


def _noncell_summary(group: dict) -> dict:
    per_class = np.bincount(group["labels"], minlength=len(CLASS_NAMES))
    return {"group": group["group"], "first_row": group["rows"][0], "copies": len(group["rows"]),
            "labels_per_class": per_class.tolist(), "rows": group["rows"]}


def summary_table(summary: dict, data):
    from rich.table import Table

    table = Table(title=f"cellfuse clean: {data}")
    table.add_column("rows")
    table.add_column("count", justify="right")
    table.add_column("why")
    table.add_row("input", str(summary["input"]), "")
    for reason in REASONS:
        table.add_row(f"[red]- {reason}[/]", str(summary[reason]), EXPLAIN[reason])
    table.add_row("[green]kept[/]", str(summary["kept"]), "one image per duplicate group, no odd pictures")
    return table


# ---------------------------------------------------------------- pictures for a person

def plot_removed(images: np.ndarray, removed: list[dict], path, per_reason: int = 24,
                 ncols: int = 12) -> Path:
    """One mosaic per reason, captioned; duplicates shown beside the row they repeat."""
    plt = pyplot()
    sections = [s for s in (_section(images, removed, reason, per_reason) for reason in REASONS) if s]
    if not sections:
        sections = [("nothing removed", [], [])]
    mosaics = [_mosaic(pics, ncols, images.shape[1:]) for _, pics, _ in sections]
    width = mosaics[0].shape[1]
    heights = [m.shape[0] + 30 for m in mosaics]  # + room for the section title
    fig, axes = plt.subplots(len(sections), 1, squeeze=False, height_ratios=heights,
                             figsize=(width / 80, sum(heights) / 80))
    for ax, mosaic, (title, _, captions) in zip(axes[:, 0], mosaics, sections, strict=True):
        ax.imshow(mosaic, interpolation="nearest")
        ax.axis("off")
        ax.set_title(title, loc="left", fontsize=10)
        tile_w, tile_h = width // ncols, images.shape[1] + CAPTION_BAND
        for k, text in enumerate(captions):
            ax.text((k % ncols + 0.5) * tile_w, (k // ncols) * tile_h + CAPTION_BAND - 3, text,
                    ha="center", va="bottom", fontsize=6)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01, hspace=0.15)
    out = atomic_save_figure(fig, path)
    plt.close(fig)
    return out


CAPTION_BAND = 24  # blank pixels above each tile of a mosaic, for its two-line caption (row; full class name)


def _mosaic(pics, ncols, shape, pad=4):
    """Pictures in rows of `ncols` on white, one caption band above each row: one imshow, fast."""
    h, w = shape[:2]
    nrows = max(1, -(-len(pics) // ncols))
    canvas = np.full((nrows * (h + CAPTION_BAND), ncols * (w + pad), 3), 255, np.uint8)
    for k, pic in enumerate(pics):
        y, x = (k // ncols) * (h + CAPTION_BAND) + CAPTION_BAND, (k % ncols) * (w + pad)
        canvas[y:y + h, x:x + w] = pic
    return canvas


def _section(images, removed, reason, limit):
    """(title, pictures, captions) for one reason, or None when nothing was removed for it."""
    records = [r for r in removed if r["reason"] == reason]
    if not records:
        return None
    title = f"{reason}: {len(records)} removed"
    if reason in ("exact_duplicate", "near_duplicate"):  # each beside the row it repeats
        pics, captions = [], []
        for r in records[: limit // 2]:
            pics += [images[r["row"]], images[r["duplicate_of"]]]
            captions += [f"#{r['row']}\n{r['class']}", f"= #{r['duplicate_of']}"]
        return f"{title} (pairs: removed, the row it duplicates)", pics, captions
    if reason in ("label_conflict", "repeated_noncell"):  # group by group, labels visible
        groups = _by_group(records)
        per_group = max(2, limit // len(groups))
        spread = "; ".join(f"g{g}: {len(rs)} rows under {len({r['label'] for r in rs})} labels"
                           for g, rs in list(groups.items())[:4])
        detail = spread if reason == "repeated_noncell" else "each group's labels disagree"
        shown = [r for rs in groups.values() for r in rs[:per_group]][:limit]
        return (f"{title} in {len(groups)} groups ({detail})",
                [images[r["row"]] for r in shown],
                [f"g{r['group']} #{r['row']}\n{r['class']}" for r in shown])
    records = sorted(records, key=lambda r: -r.get("lof", 0))[:limit]
    return (f"{title} (most odd first; seed = rank by distance from the mean)",
            [images[r["row"]] for r in records],
            [f"#{r['row']} lof {r.get('lof', 0):.1f} seed {r.get('seed_rank', '-')}" for r in records])


def _by_group(records) -> dict[int, list[dict]]:
    groups = {}
    for r in sorted(records, key=lambda r: (r["group"], r["row"])):
        groups.setdefault(r["group"], []).append(r)
    return groups


MARKERS = {"repeated_noncell": ("X", "black"), "outlier": ("*", "red"),
           "label_conflict": ("D", "magenta"), "exact_duplicate": ("s", "dimgray"),
           "near_duplicate": ("^", "darkorange")}


def plot_tsne(images: np.ndarray, labels: np.ndarray, removed: list[dict], path,
              max_points: int = 2000, seed: int = 0) -> Path | None:
    """t-SNE of PCA(50) of the cheap features: kept images by class, removed ones marked by reason.

    At most `max_points` are embedded (up to 100 per reason: copies of one picture add nothing,
    kept images fill the rest), so the cost stays flat as the data grows.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    reason_of = {r["row"]: r["reason"] for r in removed}
    rows = []
    for reason in REASONS:
        these = np.array([r for r, why in reason_of.items() if why == reason], np.int64)
        rows.append(rng.permutation(these)[: max_points // 20])
    kept = np.setdiff1d(np.arange(len(images)), np.fromiter(reason_of, np.int64, len(reason_of)))
    rows.append(rng.permutation(kept)[: max(0, max_points - sum(map(len, rows)))])
    rows = np.sort(np.concatenate(rows))
    if len(rows) < 5:
        return None
    with one_thread():
        z = StandardScaler().fit_transform(image_features(images[rows]))
        z = PCA(min(50, *z.shape), random_state=seed).fit_transform(z)
        # 500 iterations and a coarser Barnes-Hut (angle 0.8) are plenty for a picture, at half the cost.
        xy = TSNE(perplexity=min(30.0, (len(rows) - 1) / 3), init="pca", max_iter=500, angle=0.8,
                  random_state=seed).fit_transform(z)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 8))
    why = np.array([reason_of.get(r, "") for r in rows])
    kept_mask = why == ""
    sc = ax.scatter(*xy[kept_mask].T, c=labels[rows][kept_mask], cmap="tab10", s=5, alpha=0.5,
                    vmin=0, vmax=9)
    handles = [plt.Line2D([], [], ls="", marker="o", color=sc.cmap(sc.norm(c)), label=_class_name(c))
               for c in np.unique(labels[rows][kept_mask])]
    for reason, (marker, colour) in MARKERS.items():
        m = why == reason
        if m.any():
            handles.append(ax.scatter(*xy[m].T, marker=marker, c=colour, s=40, linewidths=0.4,
                                      edgecolors="white", label=f"{reason} ({m.sum()} shown)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"t-SNE of PCA(50) colour features: {len(rows)} of {len(images)} images", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    out = atomic_save_figure(fig, path)
    plt.close(fig)
    return out


def one_thread():
    """BLAS/OpenMP limited to one thread: these matrices are small, and spinning worker threads cost
    more than they save (measured 3-20x slower PCA and t-SNE on this shared 2-core machine)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)
