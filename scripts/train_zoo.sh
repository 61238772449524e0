#!/bin/sh
# Retrain the shipped model zoo into src/srdxai/models/weights (about 30-40 min on 2 CPU cores).
# The ResNet-style model with each of the six activations (the activation table), the VGG-style
# model with ReLU, and the small ViT with GELU. Same settings as the shipped cards.
set -e
OUT="${1:-src/srdxai/models/weights}"
SRDXAI="${SRDXAI:-.venv/bin/srdxai}"
for act in relu elu leaky_relu silu gelu tanh; do
    "$SRDXAI" train --arch resnet --activation "$act" --out "$OUT"
done
"$SRDXAI" train --arch vgg --activation relu --epochs 4 --out "$OUT"
"$SRDXAI" train --arch vit --activation gelu --epochs 8 --out "$OUT"
