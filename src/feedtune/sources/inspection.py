"""Exploratory look at a data set before any training: what ``feedtune inspect`` reports.

Every file of the table is read once: its SHA-256 (exact duplicates, and duplicates that sit on
both sides of the split, which leak val images into training), a structural check
(``check_image``) and the header only (format, colour mode, size; no pixels decoded). The
result is a per-file table, a JSON-serialisable summary and advice lines that each carry the
figure they rest on, so a user can judge a suggestion before following it.

Pure analysis: no MLflow, no plotting (``feedtune.tracking.inspect_plots`` draws the figures).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from feedtune.progress import progress_bar
from feedtune.sources.imageio import BadImageError
from feedtune.sources.items import FILES, ItemReader
from feedtune.sources.split import Split

# Largest/smallest class above this: plain random sampling starves the small classes.
IMBALANCE_LIMIT = 3.0
# Fewer val images than this per class: one image moves the class's recall by >= 10 points.
MIN_VAL_IMAGES = 10
# Images at least this many times the working size: the same threshold at which JPEGs are
# decoded at reduced size, i.e. where decoding full-size pixels is mostly wasted.
LARGE_FACTOR = 2
# ``side`` of a file that is in the table but not in the split (a bad file, skipped).
EXCLUDED = "excluded"
COLUMNS = ["path", "label", "group", "side", "width", "height", "format", "mode", "bytes"]
COLUMNS += ["sha256", "bad"]
# Example paths named in a summary list or an advice line.
_SHOW = 5


@dataclass
class Inspection:
    """What ``inspect_data`` found.

    ``files`` has one row per file of the table (columns ``COLUMNS``; ``path`` absolute,
    ``bad`` the reason or "" for a good file, width/height/format/mode empty for a bad one).
    """

    files: pd.DataFrame
    summary: dict[str, Any]
    advice: list[str]
    root: str
    image_size: int
    working_size: int
    decoder: str
    reader: ItemReader = FILES  # how the source's items are read (the example grid too)

    @property
    def good(self) -> pd.DataFrame:
        """The files training will use (in the split, structurally sound)."""
        return self.files[(self.files["bad"] == "") & (self.files["side"] != EXCLUDED)]

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root) if self.root else path

    def examples(self, per_class: int = 4) -> dict[str, list[str]]:
        """Up to ``per_class`` good paths per class, spread evenly over the class's files."""
        out: dict[str, list[str]] = {}
        for label, rows in self.good.groupby("label", sort=True):
            paths = rows["path"].tolist()
            picks = np.linspace(0, len(paths) - 1, num=min(per_class, len(paths)), dtype=int)
            out[str(label)] = [paths[i] for i in dict.fromkeys(picks.tolist())]
        return out


def inspect_data(
    table: pd.DataFrame,
    split: Split,
    *,
    image_size: int,
    working_size: int,
    decoder: str = "pil",
    progress: bool = True,
    reader: ItemReader = FILES,
) -> Inspection:
    """Read every file of ``table`` (from ``load_table``) and relate it to ``split``.

    ``image_size`` is ``augment.image_size`` and ``working_size`` the side images are kept
    at for it (the size advice compares against both);
    ``decoder`` is kept for the example grid, so it shows what training decodes; ``reader``
    reads the items (files, Arrow rows, a user's Dataset), each ``path`` being its key.
    """
    side = {p: "train" for p in split.train["path"]} | {p: "val" for p in split.val["path"]}
    groups = table["group"] if "group" in table.columns else pd.Series([""] * len(table))
    rows = []
    for path, label, group in progress_bar(
        list(zip(table["path"], table["label"], groups, strict=True)),
        desc="inspecting images",
        unit="img",
        enabled=progress,
        leave=False,
    ):
        row = {"path": path, "label": label, "group": group, "side": side.get(path, EXCLUDED)}
        rows.append(row | _read_item(path, reader))
    files = pd.DataFrame(rows, columns=COLUMNS)
    files[["width", "height"]] = files[["width", "height"]].astype("Int64")
    root = str(split.summary.get("root", ""))
    found = Inspection(
        files,
        {},
        [],
        root=root,
        image_size=image_size,
        working_size=working_size,
        decoder=decoder,
        reader=reader,
    )
    found.summary = _summarise(found, has_groups="group" in table.columns)
    found.advice = _advise(found)
    found.summary["advice"] = found.advice
    return found


def _read_item(path: str, reader: ItemReader) -> dict[str, Any]:
    """Size, content hash, structural check and header fields of one item."""
    out: dict[str, Any] = {"width": None, "height": None, "format": "", "mode": ""}
    out["bytes"], out["sha256"] = reader.digest(path)
    out["bad"] = reader.check(path) or ""
    if out["bad"]:
        return out
    try:  # the header only where the source has one: format, mode, oriented size
        out["width"], out["height"], out["format"], out["mode"] = reader.header(path)
    except BadImageError as exc:
        out["bad"] = exc.reason
    return out


def _counts(labels: pd.Series, classes: list[str]) -> dict[str, int]:
    found = labels.value_counts()
    return {c: int(found.get(c, 0)) for c in classes}


def _stats(values: pd.Series | np.ndarray) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"min": None, "median": None, "max": None}
    stats = {"min": np.min(arr), "median": np.median(arr), "max": np.max(arr)}
    return {k: round(float(v), 3) for k, v in stats.items()}


def _summarise(found: Inspection, *, has_groups: bool) -> dict[str, Any]:
    files, good = found.files, found.good
    classes = sorted(files["label"].unique().tolist())
    used = _counts(good["label"], classes)
    present = [n for n in used.values() if n > 0]
    short = np.minimum(good["width"], good["height"]).astype(float)
    return {
        "root": found.root,
        "n_images": int(len(good)),
        "n_files": int(len(files)),
        "n_classes": len(classes),
        "classes": classes,
        "n_train": int((good["side"] == "train").sum()),
        "n_val": int((good["side"] == "val").sum()),
        "class_counts": {
            "all": _counts(files["label"], classes),
            "used": used,
            "train": _counts(good["label"][good["side"] == "train"], classes),
            "val": _counts(good["label"][good["side"] == "val"], classes),
        },
        "imbalance_ratio": round(max(present) / min(present), 3) if present else 1.0,
        "sizes": {
            "image_size": found.image_size,
            "working_size": found.working_size,
            "width": _stats(good["width"]),
            "height": _stats(good["height"]),
            "shorter_side": _stats(short),
            "aspect_ratio": _stats(good["width"].astype(float) / good["height"].astype(float)),
            "n_distinct": int(good[["width", "height"]].drop_duplicates().shape[0]),
        },
        "formats": dict(Counter(good["format"]).most_common()),
        "modes": dict(Counter(good["mode"]).most_common()),
        "bytes": {"total": int(files["bytes"].sum()), **_stats(good["bytes"])},
        "decoder": found.decoder,
        "groups": _groups(good) if has_groups else None,
        "duplicates": _duplicates(found),
        "bad": _bad(found),
    }


def _groups(good: pd.DataFrame) -> dict[str, Any]:
    per_group = good.groupby("group").size()
    return {
        "n_groups": int(per_group.size),
        "groups_per_class": {
            str(k): int(v) for k, v in good.groupby("label")["group"].nunique().items()
        },
        "images_per_group": _stats(per_group.to_numpy()),
        "n_groups_train": int(good.loc[good["side"] == "train", "group"].nunique()),
        "n_groups_val": int(good.loc[good["side"] == "val", "group"].nunique()),
    }


def _duplicates(found: Inspection) -> dict[str, Any]:
    """Sets of files with identical bytes; a set with a train and a val member is a leak."""
    files = found.files[found.files["sha256"] != ""]
    sets = [rows for _, rows in files.groupby("sha256", sort=False) if len(rows) > 1]
    leaks, conflicts = [], []
    for rows in sets:
        sides: dict[str, str] = {}
        for side, path in zip(rows["side"], rows["path"], strict=True):
            sides.setdefault(side, path)  # the first file of each side names the pair
        if "train" in sides and "val" in sides:
            leaks.append({k: found.relative(sides[k]) for k in ("train", "val")})
        if rows["label"].nunique() > 1:
            pairs = zip(rows["path"], rows["label"], strict=True)
            conflicts.append([f"{found.relative(p)} ({label})" for p, label in pairs])
    return {
        "n_sets": len(sets),
        "n_files": int(sum(len(rows) for rows in sets)),
        "n_leaked_sets": len(leaks),
        "n_conflicting_labels": len(conflicts),
        "leaks": leaks[:_SHOW],
        "conflicts": conflicts[:_SHOW],
        "sets": [[found.relative(p) for p in rows["path"]] for rows in sets[:_SHOW]],
    }


def _bad(found: Inspection) -> dict[str, Any]:
    bad = found.files[found.files["bad"] != ""]
    pairs = zip(bad["path"], bad["bad"], strict=True)
    return {
        "n_bad": int(len(bad)),
        "reasons": dict(Counter(bad["bad"]).most_common()),
        "examples": [{"path": found.relative(p), "reason": r} for p, r in pairs][:_SHOW],
    }


def _advise(found: Inspection) -> list[str]:
    """One line per finding worth acting on, each with the numbers behind it."""
    s = found.summary
    advice: list[str] = []
    used = {c: n for c, n in s["class_counts"]["used"].items() if n > 0}
    if s["imbalance_ratio"] > IMBALANCE_LIMIT:
        big, small = max(used, key=used.get), min(used, key=used.get)
        advice.append(
            f"class imbalance {s['imbalance_ratio']:.1f}:1 ('{big}' {used[big]} vs '{small}' "
            f"{used[small]} images): try --set sampler.kind=weighted"
        )
    short = s["sizes"]["shorter_side"]["median"]
    work = s["sizes"]["working_size"]
    if short is not None and short >= LARGE_FACTOR * work:
        n_other = int((found.good["format"] != "JPEG").sum())
        tail = f"; {n_other} non-JPEG image(s) are always decoded at full size" if n_other else ""
        advice.append(
            f"median shorter side {short:.0f} px is {short / work:.1f}x the working size {work} px "
            f"(augment.image_size={found.image_size}): try --set loader.cache=resized to decode "
            f"once at {work} px (JPEGs are already decoded at reduced size){tail}"
        )
    elif short is not None and short < found.image_size:
        advice.append(
            f"median shorter side {short:.0f} px is below augment.image_size={found.image_size}: "
            "most images are upsampled; a smaller augment.image_size loses nothing"
        )
    dup = s["duplicates"]
    if dup["n_leaked_sets"]:
        pair = dup["leaks"][0]
        advice.append(
            f"{dup['n_leaked_sets']} set(s) of identical files straddle the split (a leak: val "
            f"scores are inflated), e.g. {pair['train']} (train) == {pair['val']} (val): delete "
            "the copies, or put them in one group of a manifest"
        )
    if dup["n_conflicting_labels"]:
        advice.append(
            f"{dup['n_conflicting_labels']} set(s) of identical files carry different labels, "
            f"e.g. {' == '.join(dup['conflicts'][0])}: label noise to fix"
        )
    val = s["class_counts"]["val"]
    few = {c: n for c, n in val.items() if n < MIN_VAL_IMAGES and c in used}
    if few:
        listed = ", ".join(f"'{c}' {n}" for c, n in sorted(few.items(), key=lambda kv: kv[1]))
        advice.append(
            f"{len(few)} class(es) have fewer than {MIN_VAL_IMAGES} val images ({listed}): their "
            "recall, and so val macro-F1, is noisy; add images or raise split.val_fraction"
        )
    missing = [c for c, n in s["class_counts"]["train"].items() if n == 0]
    if missing:
        advice.append(f"class(es) with no training image: {', '.join(missing)}")
    bad = s["bad"]
    if bad["n_bad"]:
        reasons = ", ".join(f"{r}: {n}" for r, n in bad["reasons"].items())
        advice.append(
            f"{bad['n_bad']} bad file(s) will be skipped ({reasons}), "
            f"e.g. {bad['examples'][0]['path']}"
        )
    return advice


def format_report(found: Inspection) -> str:
    """The printed summary: counts, sizes, formats, duplicates and leaks, then the advice."""
    s = found.summary
    counts = ", ".join(f"{c} {n}" for c, n in s["class_counts"]["used"].items())
    sizes, dup = s["sizes"], s["duplicates"]
    short, aspect = sizes["shorter_side"], sizes["aspect_ratio"]
    lines = [
        f"data: {s['n_images']} images in {s['n_classes']} classes (train {s['n_train']}, "
        f"val {s['n_val']})" + (f" under {s['root']}" if s["root"] else ""),
        f"classes: {counts} (imbalance {s['imbalance_ratio']:.1f}:1)",
    ]
    if s["groups"]:
        g = s["groups"]
        lines.append(
            f"groups: {g['n_groups']} (train {g['n_groups_train']}, val {g['n_groups_val']}), "
            f"median {g['images_per_group']['median']} images per group"
        )
    if short["median"] is not None:
        lines.append(
            f"sizes: shorter side median {short['median']:.0f} px (min {short['min']:.0f}, max "
            f"{short['max']:.0f}), aspect ratio median {aspect['median']:.2f}; working size "
            f"{sizes['working_size']} px for augment.image_size={sizes['image_size']}"
        )
    fmt = ", ".join(f"{k} {v}" for k, v in s["formats"].items())
    modes = ", ".join(f"{k} {v}" for k, v in s["modes"].items())
    lines.append(f"formats: {fmt or '-'}; colour modes: {modes or '-'}")
    lines.append(
        f"duplicates: {dup['n_sets']} set(s) of identical files ({dup['n_files']} files), "
        f"{dup['n_leaked_sets']} across the split"
    )
    lines.append(f"bad files: {s['bad']['n_bad']}")
    lines.append("advice:" if found.advice else "advice: none, the data looks ready")
    lines.extend(f"  - {line}" for line in found.advice)
    return "\n".join(lines)
