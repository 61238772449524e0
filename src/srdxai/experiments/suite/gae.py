"""RAMP's Global Attribution Evaluation (GAE) on 2x2 mosaics: local consistency and
contrastiveness, on the CNNs and a ViT."""

from __future__ import annotations

from ..config import BenchConfig
from ..data import Source
from ..registry import (
    Experiment,
    MethodRow,
    UnitInputs,
    UnitResult,
    register_experiment,
)
from .table2 import TABLE2_METHODS, light_sources

__all__ = ["GAE", "GAE_CNN_METHODS", "GAE_METRICS", "GAE_VIT_METHODS"]

GAE_CNN_METHODS = [m for m in TABLE2_METHODS if m[0] in (
    "Saliency", "GradInput", "IntegratedGradients", "LRP-z+", "GradCAM", "LayerCAM-high",
    "SRD-high", "SRD-input", "absLRP")]
GAE_VIT_METHODS: list[MethodRow] = [
    ("Saliency", "saliency", {}),
    ("GradInput", "gradient_x_input", {}),
    ("IntegratedGradients", "integrated_gradients", {}),
    ("AttnLRP", "attnlrp", {}),
    ("CP-LRP", "cp_lrp", {}),
    ("AttentionRollout", "attention_rollout", {}),
    ("TransformerAttribution", "transformer_attribution", {}),
    ("SRD-tokens", "srd_tokens", {}),
    ("absLRP", "abslrp", {}),
]
GAE_METRICS = ("local_consistency", "contrastiveness", "gae")


@register_experiment
class GAE(Experiment):
    """GAE per group of four images (one row per group, under its first sample)."""

    name = "gae"
    title = "GAE"
    report_position = 50
    metrics = GAE_METRICS
    bars = True

    def sources(self, config: BenchConfig) -> list[Source]:
        return light_sources(config) + [Source("fmnist-vit-gelu", "fashion")]

    def methods(self, source: Source, config: BenchConfig) -> list[MethodRow]:
        return list(GAE_VIT_METHODS if "vit" in source.model else GAE_CNN_METHODS)

    def sample_count(self, source: Source, config: BenchConfig) -> int:
        n = super().sample_count(source, config)
        return n - n % 4  # groups of four images

    def batch_size(self, config: BenchConfig) -> int:
        step = config.batch_size
        return max(4, step - step % 4)

    def run(self, unit: UnitInputs) -> UnitResult:
        from ... import metrics

        result = metrics.gae(unit.model, unit.x, unit.y, explain=unit.explain_fn(),
                             seed=unit.seed)
        firsts = unit.job.samples[::4]
        rows = []
        for metric in ("gae", "local_consistency", "contrastiveness", "faithfulness",
                       "robustness"):
            name = metric if metric in GAE_METRICS else f"gae_{metric}"
            rows += unit.rows(name, getattr(result, metric), firsts)
        return UnitResult(rows=rows)
