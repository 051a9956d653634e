"""V-JEPA models over packed token sets: the video ViT encoder and the narrow predictor."""

from .packing import Packing
from .predictor import Predictor, PredictorLayout
from .vit import VARIANTS, Variant, VisionTransformer

__all__ = ["VARIANTS", "Packing", "Predictor", "PredictorLayout", "Variant", "VisionTransformer"]
