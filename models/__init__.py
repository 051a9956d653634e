"""V-JEPA models over packed token sets: the video ViT encoder and the narrow predictor."""

from .packing import Packing
from .predictor import Predictor, PredictorLayout
from .pretrained import CheckpointMismatch, load_pretrained
from .vit import VARIANTS, Variant, VisionTransformer

__all__ = ["VARIANTS", "CheckpointMismatch", "Packing", "Predictor", "PredictorLayout", "Variant",
           "VisionTransformer", "load_pretrained"]
