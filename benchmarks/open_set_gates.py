"""Open-set gates on the splits ``open_set.py --save DIR`` trained, without training again.

Each gate refuses an auto-accept the model's threshold allows when a statistic of the
product is below a floor. The floor is the ``q`` quantile of that statistic over the
validation rows the threshold accepts (``train()``'s own validation rows of the known
categories: nothing about the absent ones is used), so a gate costs about ``q`` of the
known auto-accepts by construction; what it buys is measured on the absent rows.

Statistics (text embeddings of the product, MiniLM as the worker computes them):
- ``centroid``: cosine to the mean of the predicted class's training rows;
- ``prototypes``: the largest cosine to up to 8 k-means centres of that class's rows;
- ``nearest``: the largest cosine to any training row of that class (what prototypes
  approximate; not storable in an artifact's meta.json);
- ``margin``: top probability minus the second one.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/open_set_gates.py var/bench/open-set
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from train_recipes import load

from shelver.worker.open_set import class_prototypes, prototype_similarity

QUANTILES = (0.05, 0.10)


def statistics(name: str, emb: np.ndarray, probs: np.ndarray, ctx: dict) -> np.ndarray:
    pred = probs.argmax(axis=1)
    if name == "margin":
        top2 = np.sort(probs, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    if name == "nearest":
        out = np.empty(len(emb), np.float32)
        for k in range(probs.shape[1]):
            rows = pred == k
            if rows.any():
                bank = ctx["fit_emb"][ctx["fit_y"] == k]
                out[rows] = (emb[rows] @ bank.T).max(axis=1) if len(bank) else -1.0
        return out
    protos, owner = ctx[name]
    return prototype_similarity(emb, pred, protos, owner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = load("bestbuy")
    emb, labels = data.inputs.text_emb, np.asarray(data.labels)
    results = []
    for path in sorted(args.folder.glob("open-set-seed*.npz")):
        z = np.load(path)
        roots = list(z["roots"])
        thr = float(z["threshold"])
        fit_y = np.array([roots.index(y) for y in labels[z["fit_rows"]]])
        fit_emb = emb[z["fit_rows"]]
        ctx = {
            "fit_emb": fit_emb,
            "fit_y": fit_y,
            "centroid": class_prototypes(fit_emb, fit_y, len(roots), per_class=1),
            "prototypes": class_prototypes(fit_emb, fit_y, len(roots), per_class=8),
        }
        test_rows, test_probs = z["test_rows"], z["test_probs"]
        absent = set(z["absent"].tolist())
        known = np.array([y not in absent for y in labels[test_rows]])
        k_rows, k_probs = test_rows[known], test_probs[known]
        k_right = np.asarray(roots)[k_probs.argmax(1)] == labels[k_rows]
        u_rows, u_probs = z["unknown_rows"], z["unknown_probs"]
        h_rows, h_probs = test_rows[~known], test_probs[~known]
        v_probs = z["val_probs"]
        v_acc = v_probs.max(axis=1) >= thr
        split = {"split": path.stem, "absent": sorted(absent), "threshold": thr, "gates": {}}
        base_k = k_probs.max(1) >= thr
        split["none"] = {
            "known_coverage": float(base_k.mean()),
            "known_accepted_precision": float(k_right[base_k].mean()),
            "unknown_auto_accepted_all": float((u_probs.max(1) >= thr).mean()),
            "unknown_auto_accepted_heldout": float((h_probs.max(1) >= thr).mean()),
            "n_known": int(known.sum()),
            "n_unknown_all": len(u_rows),
            "n_unknown_heldout": len(h_rows),
        }
        for name in ("centroid", "prototypes", "nearest", "margin"):
            v_stat = statistics(name, emb[z["val_rows"]], v_probs, ctx)
            k_stat = statistics(name, emb[k_rows], k_probs, ctx)
            u_stat = statistics(name, emb[u_rows], u_probs, ctx)
            h_stat = statistics(name, emb[h_rows], h_probs, ctx)
            for q in QUANTILES:
                floor = float(np.quantile(v_stat[v_acc], q))
                k_acc = base_k & (k_stat >= floor)
                split["gates"][f"{name}@{q:.2f}"] = {
                    "floor": floor,
                    "known_coverage": float(k_acc.mean()),
                    "known_accepted_precision": float(k_right[k_acc].mean()),
                    "unknown_auto_accepted_all": float(
                        ((u_probs.max(1) >= thr) & (u_stat >= floor)).mean()
                    ),
                    "unknown_auto_accepted_heldout": float(
                        ((h_probs.max(1) >= thr) & (h_stat >= floor)).mean()
                    ),
                }
        results.append(split)
        print(path.stem, sorted(absent))
        rows = {"none": split["none"], **split["gates"]}
        for name, g in rows.items():
            print(
                f"  {name:16s} known cov {g['known_coverage']:.3f} prec "
                f"{g['known_accepted_precision']:.3f}  unknown AA all "
                f"{g['unknown_auto_accepted_all']:.3f} "
                f"held {g['unknown_auto_accepted_heldout']:.3f}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
