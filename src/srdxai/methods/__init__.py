"""Attribution methods, each a small rule on the shared engine."""

from .abslrp import AbsLRP
from .attnlrp import CPLRP, AttnLRP
from .base import FAMILIES, METHODS, Method, by_family, get_method, register
from .cam import AblationCAM, FullGrad, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
from .chain_rule import (
    DeepLiftRescale,
    EpsilonLRP,
    GradientXInput,
    GuidedBackprop,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)
from .gradient import Gradient
from .lrp import LRPAlphaBeta, LRPEpsilon, LRPEpsilonGammaBox, LRPEpsilonPlus, LRPZPlus
from .occlusion import Occlusion
from .srd import SRD
from .srd_tokens import SRDTokens
from .transformer import AttentionRollout, TransformerAttribution

__all__ = ["FAMILIES", "METHODS", "Method", "by_family", "get_method", "register", "SRD",
           "Gradient", "Saliency",
           "GradientXInput", "IntegratedGradients", "EpsilonLRP", "DeepLiftRescale",
           "SmoothGrad", "GuidedBackprop", "Occlusion", "LRPAlphaBeta", "LRPEpsilon",
           "LRPEpsilonGammaBox", "LRPEpsilonPlus", "LRPZPlus", "GradCAM", "GradCAMPlusPlus",
           "XGradCAM", "LayerCAM", "ScoreCAM", "AblationCAM", "FullGrad", "AbsLRP",
           "AttentionRollout", "TransformerAttribution", "AttnLRP", "CPLRP",
           "SRDTokens"]
