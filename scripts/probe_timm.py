"""Run SRD and the main relevance methods on one small variant of 80 timm model families
(random weights, float64) and write what each does: SRD's map sum against the target logit, or
the clear refusal, and for the other methods a finite map or a refusal. Finds silently wrong
maps (SRD must sum to the logit) and crashes (anything but a map or a clear refusal).

    python scripts/probe_timm.py [--out docs/timm_probe.md] [--models a,b,...]

About 11 minutes on 2 CPU cores; each model runs in a process of its own (a timeout of 300 s).
Biases and BatchNorm statistics are randomised (timm initialises many biases to 0, which would
hide SRD's bias shares); inputs are 64 x 64 where the model takes them, else its own size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = """
resnet18d seresnet18 skresnet18 resnest14d res2net50_26w_4s sebotnet33ts_256 halonet26t
lambda_resnet26t bat_resnext26ts gcresnet33ts eca_halonext26ts nf_resnet26 nfnet_l0 dm_nfnet_f0
regnetz_b16 tresnet_m cs3darknet_s darknet53 dpn68 selecsls42b inception_v3 inception_v4
inception_resnet_v2 gernet_s hardcorenas_a tinynet_e fbnetc_100 spnasnet_100 mnasnet_small
ghostnetv2_100 efficientvit_b0 efficientvit_m0 efficientformer_l1 efficientformerv2_s0
fastvit_t8 mobileone_s0 repghostnet_050 repvit_m1 mobilevitv2_050 mixer_s32_224 resmlp_12_224
gmlp_ti16_224 poolformer_s12 poolformerv2_s12 convformer_s18 caformer_s18 cait_xxs24_224
xcit_nano_12_p16_224 coat_lite_tiny crossvit_tiny_240 pvt_v2_b0 twins_svt_small
twins_pcpvt_small beit_base_patch16_224 eva02_tiny_patch14_224 davit_tiny focalnet_tiny_srf
gcvit_xxtiny maxvit_nano_rw_256 coatnet_nano_rw_224 nest_tiny volo_d1_224 edgenext_xx_small
inception_next_tiny sequencer2d_s visformer_tiny hgnet_tiny hgnetv2_b0 vovnet39a
tiny_vit_5m_224 hiera_tiny_224 mambaout_femto convnextv2_atto rdnet_tiny starnet_s050
fasternet_t0 nasnetalarge pnasnet5large convmixer_768_32 tnt_s_patch16_224
""".split()

METHODS = ["srd", "abslrp", "lrp_epsilon_plus", "attnlrp", "gradcam", "fullgrad",
           "gradient_x_input"]


def probe(name: str) -> dict:
    """One model in this process: what every method in :data:`METHODS` does."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(ROOT / "tests"))
    from _compat import import_torchvision

    import_torchvision()
    import timm
    import torch

    import srdxai
    from srdxai.errors import InvalidInputError, OperationViewWarning, UnsupportedOperationError

    torch.manual_seed(0)
    model = x = None
    for options, size in (({"img_size": 64}, 64), ({}, 64), ({}, None)):
        try:
            model = timm.create_model(name, pretrained=False, num_classes=5, **options).eval()
            size = size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
            x = torch.randn(2, 3, size, size)
            with torch.no_grad():
                model(x)
            break
        except Exception:  # noqa: BLE001 - try the next configuration
            model = None
    if model is None:
        return {"name": name, "error": "does not build here"}
    with torch.no_grad():
        for module in model.modules():
            for key, p in module.named_parameters(recurse=False):
                if key == "bias":
                    p.normal_(0, 0.1)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and \
                    module.running_var is not None:
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model, x = model.double(), x.double()
    target = [1, 3]
    with torch.no_grad():
        logits = model(x)[torch.arange(2), torch.tensor(target)]
    result: dict = {"name": name, "size": x.shape[-1]}
    for method in METHODS:
        try:
            if method == "srd":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", OperationViewWarning)
                    m = srdxai.SRD(model, seed="logit").attribute(x, target)
                view = any(issubclass(w.category, OperationViewWarning) for w in caught)
            else:
                m = srdxai.explain(model, x, target=target, method=method)
            cell = {"status": "ok" if bool(torch.isfinite(m).all()) else "NON-FINITE"}
            if method == "srd":
                error = (m.sum((1, 2)) - logits).abs() / logits.abs().clamp_min(1e-12)
                cell["relative_error"] = float(error.max())
                cell["operation_view"] = view
        except (UnsupportedOperationError, InvalidInputError) as refusal:
            cell = {"status": "refused", "why": str(refusal).split(". ")[0][:160]}
        except Exception as crash:  # noqa: BLE001 - a crash is what the probe looks for
            cell = {"status": "CRASH", "why": f"{type(crash).__name__}: {crash}"[:160]}
        result[method] = cell
    return result


def cell_text(cell: dict, method: str) -> str:
    if cell["status"] == "ok" and method == "srd":
        error = cell["relative_error"]
        view = " (operation view)" if cell.get("operation_view") else ""
        return f"exact{view}" if error < 1e-6 else f"**off by {error:.1e}**{view}"
    return {"ok": "map", "refused": "refused"}.get(cell["status"], f"**{cell['status']}**")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "probe" / "timm_probe.md")
    parser.add_argument("--models", help="comma-separated timm names (default: all 80)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(probe(args.one)))
        return
    names = args.models.split(",") if args.models else MODELS
    rows = []
    began = time.perf_counter()
    for i, name in enumerate(names, 1):
        try:
            done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True,
                                  text=True, timeout=300, check=False)
            lines = done.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if lines else {"name": name, "error": "no output"}
        except subprocess.TimeoutExpired:
            row = {"name": name, "error": "over 300 s"}
        rows.append(row)
        print(f"[{i}/{len(names)}, {time.perf_counter() - began:.0f} s] {name}: "
              + ", ".join(f"{m} {cell_text(row[m], m)}" for m in METHODS if m in row)
              + (row.get("error", "")), flush=True)
    write(args.out, rows)


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "| model | input | " + " | ".join(METHODS) + " |"
    lines = [head, "|" + "---|" * (len(METHODS) + 2)]
    refusals = []
    for row in rows:
        if "error" in row:
            lines.append(f"| `{row['name']}` | - | " + " | ".join(["-"] * len(METHODS))
                         + f" |  <!-- {row['error']} -->")
            continue
        lines.append(f"| `{row['name']}` | {row['size']} | "
                     + " | ".join(cell_text(row[m], m) for m in METHODS) + " |")
        for m in METHODS:
            if row[m]["status"] != "ok":
                refusals.append(f"- `{row['name']}`, {m}: {row[m]['why']}")
    srd = [r["srd"] for r in rows if "srd" in r]
    exact = sum(c["status"] == "ok" and c["relative_error"] < 1e-6 for c in srd)
    wrong = sum(c["status"] == "ok" and c["relative_error"] >= 1e-6 for c in srd)
    view = sum(c["status"] == "ok" and bool(c.get("operation_view")) for c in srd)
    summary = (f"SRD: {exact} of {len(rows)} exact (map sum = logit to 1e-6 in float64; "
               f"{view} of them on the operation view, which the PFV engine cannot "
               f"decompose), {wrong} off, the rest refused with a clear error.")
    path.write_text("\n".join([summary, "", *lines, "", "Why each refusal:", "", *refusals])
                    + "\n")
    print(summary)
    print(f"written {path}")


if __name__ == "__main__":
    main()
