"""Everything that runs: the bilevel search, retraining, export and the CLI.

The only layer that touches ``tf.GradientTape``, ``tf.function`` and files.
"""

from .bilevel import Bilevel
from .data import ImageData, load_image_data, pipeline
from .export import export_saved_model, verify_saved_model
from .optimizers import CoupledAdam, CoupledSGD, cosine_learning_rate
from .retrain import retrain
from .search import build_search, search
from .workflow import export_run, run_compile_and_search
