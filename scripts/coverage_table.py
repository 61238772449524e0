"""Print the architecture coverage table (README and docs/coverage.md) by running every
registered method on every architecture of the coverage suite (tests/coverage_archs.py).

    python scripts/coverage_table.py [--full docs/coverage.md]

About 5 minutes on 2 CPU cores. Each cell: a finite map, or the method's clear refusal.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from coverage_archs import ARCHS, build, inputs, run_cell  # noqa: E402
from srdxai.methods import METHODS  # noqa: E402

GROUPS = {
    "SRD": ["srd"],
    "absLRP": ["abslrp"],
    "LRP composites": sorted(m for m in METHODS if m.startswith("lrp_")),
    "AttnLRP / CP-LRP": ["attnlrp", "cp_lrp"],
    "gradient family": ["gradient", "saliency", "gradient_x_input", "integrated_gradients",
                        "smoothgrad", "guided_backprop", "deeplift_rescale", "epsilon_lrp"],
    "occlusion": ["occlusion"],
    "CAMs": ["gradcam", "gradcam_pp", "xgradcam", "layercam", "scorecam", "ablationcam",
             "fullgrad"],
    "attention maps": ["attention_rollout", "transformer_attribution", "srd_tokens"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", type=Path, help="also write the per-method matrix here")
    parser.add_argument("--archs", help="only architectures whose name starts with one of "
                                        "these comma-separated prefixes (e.g. torchvision:)")
    args = parser.parse_args()
    archs = [a for a in ARCHS if not args.archs or a.name.startswith(
        tuple(args.archs.split(",")))]
    warnings.filterwarnings("ignore")
    missing = set(METHODS) - {m for ms in GROUPS.values() for m in ms}
    assert not missing, f"methods without a column: {missing}"
    results: dict[str, dict[str, str]] = {}
    reasons: dict[str, dict[str, str]] = {}
    for arch in archs:
        model, x = build(arch), inputs(arch)
        results[arch.name], reasons[arch.name] = {}, {}
        for method in sorted(METHODS):
            cell = run_cell(model, x, method)
            results[arch.name][method] = cell.status
            reasons[arch.name][method] = cell.detail
        print(f"{arch.name}: done", file=sys.stderr)
    header = "| architecture | family | " + " | ".join(GROUPS) + " |"
    lines = [header, "|" + "---|" * (len(GROUPS) + 2)]
    for arch in archs:
        row = results[arch.name]
        cells = []
        for methods in GROUPS.values():
            ok = sum(row[m] == "ok" for m in methods)
            cells.append("yes" if ok == len(methods) else "-" if ok == 0 else
                         f"{ok}/{len(methods)}")
        lines.append(f"| {arch.name} | {arch.family} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.full:
        methods = sorted(METHODS)
        full = ["| method | " + " | ".join(a.name for a in archs) + " |",
                "|" + "---|" * (len(archs) + 1)]
        for m in methods:
            full.append(f"| {m} | " + " | ".join(
                "yes" if results[a.name][m] == "ok" else "-" for a in archs) + " |")
        notes = [f"* **{a.name}**, {m}: {reasons[a.name][m]}" for a in archs for m in methods
                 if results[a.name][m] != "ok"]
        args.full.write_text(
            "# Architecture coverage\n\nWritten by `python scripts/coverage_table.py --full "
            "docs/coverage.md` (random-weight timm and torchvision models, small inputs; the "
            "same cells are checked by `tests/test_coverage.py`). *yes*: a finite map of the "
            "input's size; "
            "*-*: a clear refusal (why below).\n\n## By method group\n\n" + table +
            "\n\n## By method\n\n" + "\n".join(full) + "\n\n## Why each refusal\n\n" +
            "\n".join(notes) + "\n")


if __name__ == "__main__":
    main()
