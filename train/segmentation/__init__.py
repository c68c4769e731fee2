"""Semantic segmentation with SPD: Swin + UperNet on PASCAL-Context."""
