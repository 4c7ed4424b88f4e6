"""Lung segmentation: a U-Net from segmentation-models-pytorch trained on image/mask pairs, and lung
masks predicted for any image folder, so CAM energy can be measured inside the lungs (`localize`).

Why segmentation-models-pytorch and not MONAI: its `Unet` takes any timm/torchvision encoder (the
ResNet family the classifiers here already use), builds with `encoder_weights=None` without touching
the network, and adds one small wheel on top of timm, which is installed already; MONAI would add a
large framework whose transforms and loaders duplicate the project's own data path. Random
initialisation, because nothing downloads here.
"""

from xraylens.segment.metrics import dice_iou
from xraylens.segment.predict import PredictSummary, mask_to_original, predict_masks, split_images
from xraylens.segment.train import SegmentConfig, SegmentSummary, train_segmentation

__all__ = [
    "PredictSummary",
    "SegmentConfig",
    "SegmentSummary",
    "dice_iou",
    "mask_to_original",
    "predict_masks",
    "split_images",
    "train_segmentation",
]
