"""The report's sections for what `sanity`, `audit` and clinical fusion leave in a run folder.

* Sanity check (RUN/sanity/sanity.json, sanity_<method>.png): the verdict per method with the stated
  threshold, the similarity table (trained vs randomised maps) and the cascading plots.
* Shortcut audit (RUN/audit/audit.json): the verdict with its evidence and rule, and per class and
  region the CAM energy beside the area and the occlusion flips beside their controls.
* Clinical inputs (RUN/clinical.json, clinical_importance-<split>.json): the columns and what the
  train split fitted for each, the leakage guard's scores and any column let through, and the
  permutation importance per evaluated split.

Numbers are shown as the files hold them (rounded for display only); the folders are the commands'
defaults (`xraylens sanity RUN`, `xraylens audit RUN`).
"""

from __future__ import annotations

from typing import Any

from xraylens.report import figures
from xraylens.report.sections import (
    Damaged,
    Figure,
    Heading,
    KeyValues,
    Note,
    RunFiles,
    Section,
    _ci_text,
    _num,
    _safe,
    fmt,
    read_json,
    table,
)

SANITY_DIR = "sanity"
AUDIT_DIR = "audit"
MEASURES = (("spearman", "Spearman"), ("ssim", "SSIM"), ("hog", "HOG"))


def _mean_ci(row: dict[str, Any], measure: str) -> str:
    """'0.042 [-0.020, 0.090]': a measure's mean and its bootstrap interval, as sanity.json holds them."""
    mean = _num(row.get(f"{measure}_mean"))
    ci = [row.get(f"{measure}_ci_low"), row.get(f"{measure}_ci_high")]
    return f"{fmt(mean)} {_ci_text(ci)}" if mean is not None else "—"


def sanity_section(rf: RunFiles) -> Section:
    sec = Section("sanity", "Sanity check: model randomisation")
    path = rf.path(SANITY_DIR) / "sanity.json"
    if not path.is_file():
        return sec.missing(
            "no sanity check (sanity/sanity.json): run", rf.command("sanity", "--split", rf.explain_split())
        )
    s = read_json(path)
    verdicts = s.get("verdicts")
    if not isinstance(verdicts, dict) or not verdicts:
        raise Damaged("sanity/sanity.json has no verdicts")
    threshold = _num(s.get("threshold"))
    items = [
        ("images", f"{fmt(s.get('n_images'))} of the {fmt(s.get('split'))} split"),
        ("methods", fmt(s.get("methods"))),
        ("layers", fmt(s.get("layers"))),
        ("units (input side first)", fmt(s.get("units_forward_order"))),
        ("maps of", fmt(s.get("target"))),
        ("re-initialisation", fmt(s.get("reinit"))),
        ("threshold", fmt(threshold)),
        ("rule", fmt(s.get("rule"))),
    ]
    lab = s.get("label_randomization")
    if isinstance(lab, dict):
        items.append(("label randomisation", ", ".join(f"{k}: {fmt(v)}" for k, v in lab.items())))
    sec.blocks.append(KeyValues(items))
    has_label = any("label_verdict" in (v or {}) for v in verdicts.values())
    header = ["method", "verdict", "Spearman, fully randomised [95 % CI]", "SSIM", "HOG"]
    header += ["label randomisation", "Spearman, shuffled labels"] if has_label else []
    rows = []
    for m, v in verdicts.items():
        v = v if isinstance(v, dict) else {}
        sp = _num(v.get("spearman_full_randomization"))
        row = [m, fmt(v.get("verdict")), f"{fmt(sp)} {_ci_text(v.get('spearman_ci'))}" if sp is not None else "—"]
        row += [_num(v.get("ssim_full_randomization")), _num(v.get("hog_full_randomization"))]
        if has_label:
            row += [fmt(v.get("label_verdict")), _num(v.get("spearman_label_randomization"))]
        rows.append(row)
    kinds = ["flagged" if (verdicts[m] or {}).get("verdict") == "FAIL" else "" for m in verdicts]
    sec.blocks.append(
        table(
            header,
            rows,
            row_kinds=kinds,
            title="Verdict per method",
            caption=f"PASS: mean Spearman (trained vs fully randomised maps) below {fmt(threshold)}",
        )
    )
    sec.facts["sanity"] = {m: (v or {}).get("verdict") for m, v in verdicts.items()}
    failed = [m for m, v in verdicts.items() if (v or {}).get("verdict") == "FAIL"]
    if failed:
        sec.notes.append(
            Note(
                f"{', '.join(failed)} FAIL the sanity check: their maps survive randomising the model's weights, "
                "so they show the architecture or the image rather than what the model learned",
                kind="warn",
            )
        )
    srows = [r for r in s.get("rows") or [] if isinstance(r, dict)]
    if srows:
        sec.blocks.append(Heading("Similarity of the trained model's maps to the randomised models' maps"))
        sec.blocks.append(
            table(
                [
                    "test",
                    "step",
                    "randomised unit",
                    "method",
                    *[f"{n} [95 % CI]" for _, n in MEASURES],
                    "n",
                    "constant",
                ],
                [
                    [
                        r.get("test"),
                        r.get("step"),
                        r.get("unit"),
                        r.get("method"),
                        *[_mean_ci(r, k) for k, _ in MEASURES],
                        r.get("n"),
                        r.get("n_constant"),
                    ]
                    for r in srows
                ],
                caption="cascading: the head, then each unit below it too, re-initialised; independent: one unit "
                "at a time; label: a copy trained on shuffled labels. Means over the images; constant: maps "
                "of the randomised model with no peak",
            )
        )
    for m in s.get("methods") or list(verdicts):
        png = rf.path(SANITY_DIR) / f"sanity_{_safe(str(m))}.png"
        if not png.is_file():
            continue
        try:
            uri = figures.embed_png(png)
        except Exception as e:  # a truncated PNG costs only its figure
            sec.notes.append(Note(f"sanity/{png.name} cannot be read as an image ({e})", kind="damaged"))
            continue
        sec.blocks.append(
            Figure(
                uri,
                f"cascading randomisation, {m}",
                f"sanity/{png.name}: similarity as units are randomised",
                wide=True,
            )
        )
    return sec


AUDIT_COLUMNS = (
    ("area", "area share"),
    ("n", "images"),
    ("flip_rate", "flip rate"),
    ("control_flip_rate", "control flip rate"),
    ("score_change", "score change"),
    ("control_score_change", "control score change"),
    ("accuracy_blanked", "accuracy blanked"),
)


def audit_section(rf: RunFiles) -> Section:
    sec = Section("audit", "Shortcut audit")
    path = rf.path(AUDIT_DIR) / "audit.json"
    if not path.is_file():
        return sec.missing(
            "no shortcut audit (audit/audit.json): run", rf.command("audit", "--split", rf.explain_split())
        )
    a = read_json(path)
    classes = a.get("classes")
    if not isinstance(classes, dict) or not isinstance(classes.get("all"), dict):
        raise Damaged("audit/audit.json has no per-region table")
    verdict = str(a.get("verdict") or "—")
    methods = [str(m) for m in a.get("methods") or []]
    flagged = set(a.get("flagged_regions") or [])
    items = [
        ("verdict", verdict),
        ("images", f"{fmt(a.get('n_images'))} of the {fmt(a.get('split'))} split"),
        ("accuracy on them", fmt(_num(a.get("accuracy")))),
        ("methods", ", ".join(methods) or "—"),
        ("flagged regions", ", ".join(sorted(flagged)) or "none"),
        ("border band / corner size", f"{fmt(a.get('border'))} / {fmt(a.get('corner'))} of the side"),
        ("blanked with", fmt(a.get("fill"))),
        ("control", fmt(a.get("control"))),
        ("rule", fmt(a.get("rule"))),
    ]
    if a.get("masks"):
        items.insert(4, ("lung masks", fmt(a.get("masks"))))
    sec.blocks.append(KeyValues(items))
    sec.facts["audit"] = verdict
    kind = {"SHORTCUT": "warn", "WARN": "warn"}.get(verdict, "info")
    sec.notes.append(Note(f"verdict {verdict}: " + "; ".join(str(e) for e in a.get("evidence") or []), kind=kind))
    header = ["class", "region", *[n for _, n in AUDIT_COLUMNS]]
    header += [f"energy {m}" for m in methods] + [f"energy {m}, flipped images" for m in methods]
    rows, kinds = [], []
    for cls, regions in classes.items():
        for region, row in (regions or {}).items():
            energy, flipped = row.get("energy") or {}, row.get("energy_flipped") or {}
            rows.append(
                [
                    cls,
                    region,
                    *[_num(row.get(k)) if k != "n" else row.get(k) for k, _ in AUDIT_COLUMNS],
                    *[_num(energy.get(m)) for m in methods],
                    *[_num(flipped.get(m)) for m in methods],
                ]
            )
            kinds.append("flagged" if region in flagged and cls == "all" else "")
    sec.blocks.append(Heading("Region energy and occlusion flips"))
    sec.blocks.append(
        table(
            header,
            rows,
            row_kinds=kinds,
            caption="energy: the share of positive CAM energy in the region (a uniform map scores the area share); "
            "flip rate: predictions changed when the region is blanked, beside a same-area central control; "
            "score change: of the originally predicted class's probability",
        )
    )
    return sec


def has_clinical(rf: RunFiles) -> bool:
    c = (rf.config or {}).get("clinical") or {}
    return bool(c.get("file") or c.get("from_name")) or rf.path("clinical.json").is_file()


def clinical_section(rf: RunFiles) -> Section:
    sec = Section("clinical", "Clinical inputs")
    c = (rf.config or {}).get("clinical") or {}
    mode = str(c.get("mode") or "none")
    fusion = {
        "early": "early (one constant input plane per feature)",
        "late": "late (beside the pooled image features)",
        "none": "none (image only; the table is still checked and fitted)",
    }
    items = [
        ("fusion", fusion.get(mode, mode)),
        ("table", fmt(c.get("file") or (f"file names: {c['from_name']}" if c.get("from_name") else None))),
        ("joined on", fmt(c.get("key"))),
    ]  # fmt: skip
    if mode == "late":
        items.append(("clinical MLP", fmt(c.get("mlp_hidden")) if c.get("mlp_hidden") else "none (linear)"))
    items.append(("leak threshold", fmt(_num(c.get("leak_threshold")))))
    if c.get("allow_leaky"):
        items.append(("--allow-leaky-column", fmt(c.get("allow_leaky"))))
    sec.blocks.append(KeyValues(items))
    if not rf.path("clinical.json").is_file():
        sec.notes.append(
            Note("no clinical.json: the run has not finished fitting its clinical table (train writes it)")
        )
        return sec
    d = read_json(rf.path("clinical.json"))
    cols = [x for x in d.get("columns") or [] if isinstance(x, dict)]
    if not cols:
        raise Damaged("clinical.json lists no columns")
    scores = d.get("leak_scores") or {}
    allowed = d.get("allowed_leaky") or {}
    rows = []
    for col in cols:
        name = str(col.get("name"))
        if col.get("kind") == "num":
            how = f"standardised: (x − {fmt(_num(col.get('mean')))}) / {fmt(_num(col.get('std')))}"
            fill = f"train median {fmt(col.get('fill'))}"
            feats = 2
        else:
            cats = [str(x) for x in col.get("categories") or []]
            how = f"one-hot over {len(cats)} train categories: {', '.join(cats)}; unseen → all zero"
            fill = f"most frequent {fmt(col.get('fill'))}"
            feats = len(cats) + 1
        rows.append(
            [name, fmt(col.get("kind")), how, fill + " + missing indicator", feats, _num(scores.get(name)),
             "yes" if name in allowed else ""]
        )  # fmt: skip
    sec.blocks.append(Heading("Columns and their preprocessing (fitted on the train split)"))
    sec.blocks.append(
        table(
            ["column", "type", "preprocessing", "missing value", "features", "leak score", "allowed leaky"],
            rows,
            row_kinds=["flagged" if str(col.get("name")) in allowed else "" for col in cols],
            caption="leak score: out-of-fold balanced accuracy of a depth-3 tree predicting the label from the "
            "column alone on train; refused at the leak threshold unless allowed",
        )
    )
    if allowed:
        sec.notes.append(
            Note(
                "allowed past the leakage guard (--allow-leaky-column): "
                + ", ".join(f"{k} (score {fmt(_num(v))})" for k, v in allowed.items()),
                kind="warn",
            )
        )
    sec.facts["clinical"] = [str(col.get("name")) for col in cols]
    found = sorted(rf.run_dir.glob("clinical_importance-*.json"))
    for p in found:
        split = p.stem.removeprefix("clinical_importance-")
        try:
            imp = read_json(p)
        except Damaged as e:
            sec.notes.append(Note(str(e), kind="damaged"))
            continue
        irows = [r for r in imp.get("columns") or [] if isinstance(r, dict)]
        if not irows:
            continue
        first = irows[0]
        sec.blocks.append(Heading(f"Permutation importance — {split}"))
        sec.blocks.append(
            table(
                ["column", "features", "accuracy drop (mean ± sd)", "AUC drop (mean ± sd)", "repeats"],
                [
                    [r.get("column"), r.get("features"), _pm(r, "accuracy_drop"), _pm(r, "auc_drop"), r.get("repeats")]
                    for r in irows
                ],
                caption=f"each column's features shuffled across the {fmt(first.get('n_images'))} {split} images; "
                f"unshuffled accuracy {fmt(_num(first.get('accuracy')))}, AUC {fmt(_num(first.get('auc')))}; "
                "near 0: the model does not use the column",
            )
        )
    if not found and mode in ("early", "late"):
        sec.notes.append(
            Note(
                "no permutation importance (clinical_importance-<split>.json): run",
                rf.command("evaluate", "--split", rf.val_split),
            )
        )
    return sec


def _pm(row: dict[str, Any], key: str) -> str:
    mean, sd = _num(row.get(f"{key}_mean")), _num(row.get(f"{key}_sd"))
    return f"{mean:+.3f} ± {sd:.3f}" if mean is not None and sd is not None else "—"
