"""skinscan: a screening aid that estimates the malignancy risk of a skin-lesion photo (not a diagnosis).

>>> from skinscan import Predictor
>>> result = Predictor()("examples/isic-malignant-1.jpg")   # doctest: +SKIP
"""

from .answers import Answers
from .errors import InvalidImage, ModelLoadError, SkinscanError
from .lesion import LesionPrediction, predict_lesion
from .predict import Prediction, Predictor

__version__ = "0.1.0"
__all__ = [
    "Answers",
    "InvalidImage",
    "LesionPrediction",
    "ModelLoadError",
    "Prediction",
    "Predictor",
    "SkinscanError",
    "__version__",
    "predict_lesion",
]
