"""dogtl: transfer learning with cached frozen-backbone features.

The package reads as the pipeline, in the order data flows:
data/ (folders, images, augmentation) -> features/ (stage 1: extraction, the cache, shards)
-> head/ (stage 2) -> sweep/ (many heads) -> finetune/ (stage 3) -> evaluation/ (metrics,
evaluate, predict); cli/ on top, core/ below (errors, settings, files, plots, models).

From Python, the stages are functions with the command line's defaults (see `dogtl.api`):
`dogtl.fit` (all of it in a time budget), `dogtl.extract_features`, `train_head`, `lr_find`, `sweep`, `finetune`, `evaluate`, `predict`.
"""

from dogtl.api import evaluate, extract_features, finetune, fit, lr_find, merge_cache, predict, sweep, train_head
from dogtl.core.errors import DogtlError
from dogtl.core.version import __version__

__all__ = ["fit", "extract_features", "merge_cache", "train_head", "lr_find", "sweep", "finetune", "evaluate",
           "predict", "DogtlError", "__version__"]
