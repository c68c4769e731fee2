"""Semantic segmentation: Swin + UperNet fine-tuned with SPD."""
