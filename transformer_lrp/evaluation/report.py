"""Results tables: markdown like the paper's Tables 1–2 (plus token-F1), and a long-format CSV."""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = {
    "image": [("negative_predicted_auc", "neg. AUC ↑ (pred.)"), ("positive_predicted_auc", "pos. AUC ↓ (pred.)"),
              ("negative_target_auc", "neg. AUC ↑ (target)"), ("positive_target_auc", "pos. AUC ↓ (target)"),
              ("pixel_acc", "pixel acc. ↑"), ("miou", "mIoU ↑"), ("map", "mAP ↑"), ("fg_iou", "fg IoU ↑"),
              ("fg_ap", "fg AP ↑")],
    "text": [("negative_predicted_auc", "neg. AUC ↑ (pred.)"), ("positive_predicted_auc", "pos. AUC ↓ (pred.)"),
             ("negative_target_auc", "neg. AUC ↑ (target)"), ("positive_target_auc", "pos. AUC ↓ (target)")],
    # next-token faithfulness of LLMs (evaluation.llm): areas of curves normalized by the unperturbed logit, so 3 digits
    "llm": [("lerf_auc", "LeRF AUC ↑", ".3f"), ("morf_auc", "MoRF AUC ↓", ".3f"),
            ("area", "ΔA logit ↑", ".3f"), ("area_sem", "± s.e.", ".3f"),
            ("lerf_prob_auc", "LeRF AUC prob. ↑", ".3f"), ("morf_prob_auc", "MoRF AUC prob. ↓", ".3f"),
            ("prob_area", "ΔA prob. ↑", ".3f"), ("explain_ms", "ms / prompt", ".0f")],
}


def markdown_table(results: dict[str, dict[str, float]], kind: str) -> str:
    methods = [m for m in results if m != "model"]
    if kind == "rationale":
        cols = [(k, k.replace("_", " ")) for k in results[methods[0]]]
    else:
        cols = COLUMNS[kind]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(format(results[m][c[0]], c[2] if len(c) > 2 else ".2f")
                                            for c in cols) + " |")
    return "\n".join(lines)


def write_results(path: Path, sections: list[tuple[str, str, dict]], header: str) -> None:
    """``sections``: (title, kind, results). Writes ``path``.md and ``path``.csv."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md = [header]
    rows = []
    for title, kind, results in sections:
        model = results.get("model", {})
        md.append(f"\n### {title}\n")
        if model:
            md.append("Model: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in model.items()) + "\n")
        md.append(markdown_table(results, kind))
        for method, metrics in results.items():
            for metric, value in metrics.items():
                rows.append({"section": title, "method": method, "metric": metric, "value": value})
    path.with_suffix(".md").write_text("\n".join(md) + "\n", encoding="utf-8")
    with path.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["section", "method", "metric", "value"])
        w.writeheader()
        w.writerows(rows)
