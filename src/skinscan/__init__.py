"""skinscan: a screening aid that estimates the malignancy risk of a skin-lesion photo (not a diagnosis).

>>> from skinscan import Predictor
>>> result = Predictor()("examples/isic-malignant-1.jpg")   # doctest: +SKIP
"""

from .errors import InvalidImage, ModelLoadError, SkinscanError
from .predict import Prediction, Predictor

__version__ = "0.1.0"
__all__ = ["InvalidImage", "ModelLoadError", "Prediction", "Predictor", "SkinscanError", "__version__"]
