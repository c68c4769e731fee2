"""Fine-tune Flax NNX ViTs with SPD: ``python -m train --config ... --workdir ...``."""
