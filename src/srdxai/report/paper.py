"""The SRD paper's published numbers, as data, for side-by-side display in the report.

Source: Han, Kim & Kwak, "Respect the model: Fine-grained and robust explanation with Sharing
Ratio Decomposition", ICLR 2024, transcribed from the OCR'd slides of the seeds
(``001_*.txt``, lines 125-185). These are the paper's numbers, never ours: the report prints
them under their own titles. The OCR lost some characters; every entry that needed
interpretation has a note in :data:`PAPER_TABLE2_NOTES` / :data:`PAPER_ACTIVATION_NOTES`, and
unreadable or unreported entries are NaN (shown with their note, never marked best).
"""

from __future__ import annotations

import math

__all__ = [
    "PAPER_ACTIVATIONS",
    "PAPER_ACTIVATION_ACCURACY",
    "PAPER_ACTIVATION_FIDELITY",
    "PAPER_ACTIVATION_METHODS",
    "PAPER_ACTIVATION_NOTES",
    "PAPER_ACTIVATION_SOURCE",
    "PAPER_MARKS",
    "PAPER_METRICS",
    "PAPER_METRIC_KEYS",
    "PAPER_MODELS",
    "PAPER_SOURCE",
    "PAPER_TABLE2",
    "PAPER_TABLE2_GENERAL_NOTES",
    "PAPER_TABLE2_METHODS",
    "PAPER_TABLE2_NOTES",
    "PAPER_TO_SRDXAI",
    "ACTIVATION_NAMES",
]

NAN = math.nan

PAPER_SOURCE = "paper (Han et al., ICLR 2024), VGG16 / ResNet50 on ImageNet-S50"
# The slide's caption says this table is ResNet50 on CIFAR-100, not ImageNet-S50.
PAPER_ACTIVATION_SOURCE = ("paper (Han et al., ICLR 2024), ResNet50 on CIFAR-100: fidelity per "
                           "activation function")

PAPER_MODELS = ("VGG16", "ResNet50")
#: The paper's column abbreviations and the srdxai metric each one is.
PAPER_METRIC_KEYS = {
    "Poi.": "pointing_game",
    "Att.": "attribution_localisation",
    "Spa.": "sparseness",
    "Fid.": "fidelity",
    "Sta.": "stability",
}
PAPER_METRICS = tuple(PAPER_METRIC_KEYS.values())

#: Table 2's rows in the paper's order and spelling (LRP_{z^+} written LRPz+).
PAPER_TABLE2_METHODS = (
    "Saliency", "GuidedBackprop", "GradInput", "InteGrad", "LRPz+", "Smoothgrad", "Fullgrad",
    "GradCAM", "GradCAM++", "ScoreCAM", "AblationCAM", "XGradCAM", "LayerCAM-low",
    "LayerCAM-high", "SRD-low", "SRD-high", "SRD-input",
)
#: The paper's row marks († / ‡). The caption that defines them is not in the OCR'd text; they
#: pair the CAM rows with SRD-low (†) and SRD-high (‡), i.e. the layer the map is read from.
PAPER_MARKS = {
    "GradCAM": "†", "GradCAM++": "†", "ScoreCAM": "†", "AblationCAM": "†", "XGradCAM": "†",
    "LayerCAM-low": "†", "LayerCAM-high": "‡", "SRD-low": "†", "SRD-high": "‡",
}

#: Paper method name -> the display name ``srdxai bench`` writes (``TABLE2_METHODS``); None
#: where the paper does not say which variant it means.
PAPER_TO_SRDXAI: dict[str, str | None] = {
    "Saliency": "Saliency",
    "GuidedBackprop": "GuidedBackprop",
    "GradInput": "GradInput",
    "InteGrad": "IntegratedGradients",
    "LRPz+": "LRP-z+",
    # Captum 0.6's NoiseTunnel(Saliency): absolute values (reference/SRD.md section 8)
    "Smoothgrad": "SmoothGrad-abs",
    "Fullgrad": "FullGrad",
    "GradCAM": "GradCAM",
    "GradCAM++": "GradCAM++",
    "ScoreCAM": "ScoreCAM",
    "AblationCAM": "AblationCAM",
    "XGradCAM": "XGradCAM",
    "LayerCAM-low": "LayerCAM-low",
    "LayerCAM-high": "LayerCAM-high",
    "SRD-low": "SRD-low",
    "SRD-high": "SRD-high",
    "SRD-input": "SRD-input",
    # activation table only: it names no layer / SRD variant
    "LayerCAM": None,
    "SRD(Ours)": None,
}


def _rows(table: dict[str, tuple[float, ...]]) -> dict[tuple[str, str], dict[str, float]]:
    out: dict[tuple[str, str], dict[str, float]] = {}
    for method, values in table.items():
        for i, model in enumerate(PAPER_MODELS):
            out[(model, method)] = dict(zip(PAPER_METRICS, values[5 * i:5 * i + 5], strict=True))
    return out


# Columns: VGG16 Poi. Att. Spa. Fid. Sta. | ResNet50 Poi. Att. Spa. Fid. Sta.
# Entries printed without their leading dot in the OCR ("013", "018", "017", "016", "005",
# "002", "104") are read as .013 etc.; ".628⁄" as .628; SRD-input ResNet50 Spa. ("1") is
# unreadable and kept as NaN. See PAPER_TABLE2_NOTES.
PAPER_TABLE2: dict[tuple[str, str], dict[str, float]] = _rows({
    "Saliency": (.793, .394, .494, .093, .181, .654, .370, .488, .063, .172),
    "GuidedBackprop": (.892, .480, .711, .022, .100, .871, .498, .741, .022, .112),
    "GradInput": (.781, .387, .630, .013, .181, .639, .361, .626, .018, .178),
    "InteGrad": (.869, .416, .618, .017, .175, .759, .382, .614, .016, .171),
    "LRPz+": (.855, .456, .535, .098, .182, .543, .332, .572, .012, .105),
    "Smoothgrad": (.845, .363, .536, .005, .190, .888, .396, .556, .002, .166),
    "Fullgrad": (.796, .362, .334, .107, .203, .938, .387, .262, .123, .689),
    "GradCAM": (.945, .431, .466, .175, .583, .946, .424, .411, .128, .757),
    "GradCAM++": (.932, .429, .351, .176, .570, .945, .414, .386, .129, .732),
    "ScoreCAM": (.937, .582, .342, .167, .622, .916, .381, .313, .123, .827),
    "AblationCAM": (.928, .481, .493, .189, .622, .934, .394, .329, .133, .814),
    "XGradCAM": (.896, .406, .446, .181, .576, .946, .424, .411, .126, .753),
    "LayerCAM-low": (.869, .425, .446, .175, .450, .934, .411, .379, .128, .734),
    "LayerCAM-high": (.865, .435, .401, .199, .423, .941, .423, .349, .135, .486),
    "SRD-low": (.945, .424, .437, .179, .595, .946, .544, .682, .130, .600),
    "SRD-high": (.948, .566, .629, .206, .406, .952, .579, .628, .142, .375),
    "SRD-input": (.925, .561, .788, .069, .099, .953, .576, NAN, .080, .104),
})

_NO_DOT = "OCR text '{raw}' lost its leading dot: read as {value} (sign: see the notes)."
#: Caveats about the whole table, shown once under it.
PAPER_TABLE2_GENERAL_NOTES = (
    "Only the Fid. cells of GradInput, InteGrad and Smoothgrad lost their leading dot in the "
    "OCR; these methods have negative fidelity in the paper's activation table, so a lost minus "
    "sign cannot be ruled out for them: check against the paper before citing those six cells.",
)
#: (model, paper method, srdxai metric) -> how the entry was read.
PAPER_TABLE2_NOTES: dict[tuple[str, str, str], str] = {
    ("VGG16", "GradInput", "fidelity"): _NO_DOT.format(raw="013", value=".013"),
    ("ResNet50", "GradInput", "fidelity"): _NO_DOT.format(raw="018", value=".018"),
    ("VGG16", "InteGrad", "fidelity"): _NO_DOT.format(raw="017", value=".017"),
    ("ResNet50", "InteGrad", "fidelity"): _NO_DOT.format(raw="016", value=".016"),
    ("VGG16", "Smoothgrad", "fidelity"): _NO_DOT.format(raw="005", value=".005"),
    ("ResNet50", "Smoothgrad", "fidelity"): _NO_DOT.format(raw="002", value=".002"),
    ("ResNet50", "SRD-high", "sparseness"): (
        "OCR text '.628⁄': the trailing mark is an OCR artefact (probably the paper's "
        "underline or bold of a top entry); read as .628."),
    ("ResNet50", "SRD-input", "sparseness"): (
        "OCR text '1': digits lost; a Gini sparseness of exactly 1 (one non-zero pixel) is "
        "implausible for an input-resolution map, so the entry is unreadable and kept as NaN."),
    ("ResNet50", "SRD-input", "fidelity"): (
        "OCR text '.08' has two digits where every other entry has three: read as .080; a lost "
        "third digit (.08x) is possible."),
    ("ResNet50", "SRD-input", "stability"): (
        "OCR text '104' lost its leading dot: read as .104 (stability is a Lipschitz estimate "
        "and every other entry is below 1)."),
}

# --- fidelity per activation function (ResNet50, CIFAR-100) ------------------------------------

PAPER_ACTIVATIONS = ("ReLU", "ELU", "LeakyReLU", "Swish", "GeLU", "Tanh")
#: The activation part of an ``fmnist-resnet-<activation>`` model name -> the paper's column.
ACTIVATION_NAMES = {
    "relu": "ReLU", "elu": "ELU", "leaky_relu": "LeakyReLU", "silu": "Swish", "gelu": "GeLU",
    "tanh": "Tanh",
}
PAPER_ACTIVATION_METHODS = (
    "GuidedBackprop", "GradInput", "InteGrad", "LRPz+", "Smoothgrad", "Fullgrad", "GradCAM",
    "ScoreCAM", "AblationCAM", "XGradCAM", "LayerCAM", "SRD(Ours)",
)
# Rows in PAPER_ACTIVATIONS order; LRPz+ has '-' for every activation but ReLU (NaN here).
PAPER_ACTIVATION_FIDELITY: dict[str, dict[str, float]] = {
    method: dict(zip(PAPER_ACTIVATIONS, values, strict=True)) for method, values in {
        "GuidedBackprop": (0.064, 0.025, 0.001, 0.015, 0.030, 0.028),
        "GradInput": (-0.010, -0.007, -0.005, -0.024, -0.004, -0.006),
        "InteGrad": (0.006, 0.015, -0.001, -0.008, -0.007, 0.014),
        "LRPz+": (0.039, NAN, NAN, NAN, NAN, NAN),
        "Smoothgrad": (-0.012, 0.026, -0.014, -0.023, -0.009, -0.017),
        "Fullgrad": (0.038, 0.209, 0.029, 0.171, 0.095, 0.107),
        "GradCAM": (0.005, -0.014, -0.004, 0.042, -0.001, 0.002),
        "ScoreCAM": (0.013, 0.052, 0.031, 0.061, 0.010, 0.017),
        "AblationCAM": (0.020, 0.024, 0.003, 0.015, 0.033, 0.012),
        "XGradCAM": (0.007, 0.011, 0.018, 0.028, 0.012, 0.017),
        "LayerCAM": (0.021, 0.042, 0.012, 0.018, 0.007, -0.001),
        "SRD(Ours)": (0.078, 0.214, 0.065, 0.194, 0.128, 0.115),
    }.items()
}
#: Test accuracy of each ResNet50 variant, from the table's caption.
PAPER_ACTIVATION_ACCURACY = dict(zip(
    PAPER_ACTIVATIONS, (0.780, 0.746, 0.785, 0.756, 0.767, 0.685), strict=True))
#: (paper method, activation) -> note; "*" as the activation applies to the whole row.
PAPER_ACTIVATION_NOTES: dict[tuple[str, str], str] = {
    ("LRPz+", "*"): ("the paper reports LRPz+ for ReLU only ('-' elsewhere); kept as NaN and "
                     "shown as '-'."),
    ("LayerCAM", "*"): "the table does not say at which layer (low or high) LayerCAM is read.",
    ("SRD(Ours)", "*"): "the table does not say which SRD variant (low, high or input) is shown.",
}
