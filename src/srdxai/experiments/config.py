"""What determines a run's numbers: the configuration ``srdxai bench`` hashes and stores."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .own import OwnSetup
from .protocol import Protocol

__all__ = ["BenchConfig", "QUICK_OPTIONS", "method_options"]

#: the experiments a run does when none are named, in this order (the order of the units)
DEFAULT_EXPERIMENTS = ("table2", "activation", "sensitivity_n", "insertion_deletion", "gae",
                       "noise", "apop", "attack", "grid", "randomisation",
                       "text_sensitivity_n", "text_localisation")
#: method options that keep ``--quick`` quick (the full run uses each method's defaults)
QUICK_OPTIONS = {"integrated_gradients": {"steps": 16}, "smoothgrad": {"samples": 8}}


@dataclass
class BenchConfig:
    """Everything that determines a run's numbers (hashed; a resumed run must match)."""

    experiments: list[str] = field(default_factory=lambda: list(DEFAULT_EXPERIMENTS))
    quick: bool = False
    seed: int = 0
    batch_size: int = 8
    samples: int | None = None  # per model; default 32 (quick) / 256 (fashion), 96 (composites)
    device: str = "cpu"
    #: how Table 2 and the activation table score maps (fidelity protocol and its variants,
    #: MuFidelity, pointing tolerance, stability draws)
    protocol: Protocol = field(default_factory=Protocol)
    #: only the models matching one of these names or fnmatch patterns (None: all)
    models: list[str] | None = None
    #: your model, data, methods and metrics (the ``evaluate`` experiment)
    own: OwnSetup | None = None

    def sizes(self, dataset: str) -> int:
        """Samples per model on ``dataset`` (before an experiment's own reduction)."""
        if self.samples is not None:
            return self.samples
        if self.quick:
            return 32
        return 96 if dataset == "composites" else 256

    @property
    def fidelity_runs(self) -> int:
        return 50 if self.quick else 100

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.public(), sort_keys=True).encode()).hexdigest()[:16]

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("device")  # where it runs does not change what it computes
        d["protocol"] = self.protocol.public()
        if self.own is None:
            d.pop("own")  # the hash of a run without your model is as it was before
        return d


def method_options(method: str, options: dict[str, Any], quick: bool) -> dict[str, Any]:
    """A row's options for ``explain``: its own, over the ``--quick`` ones of its method."""
    return {**(QUICK_OPTIONS.get(method, {}) if quick else {}), **options}
