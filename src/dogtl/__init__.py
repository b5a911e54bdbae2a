"""dogtl: transfer learning with cached frozen-backbone features.

The package reads as the pipeline, each layer importing only the ones before it:
core/ (errors, settings, files, models, progress events) < data/ (folders, images,
augmentation) < features/ (stage 1: extraction, the cache, shards) < head/ (stage 2) <
sweeps/ (many heads, --auto) < evaluation/ (evaluate, predict) < finetuning/ (stage 3) <
serving/ (export, serve, the bot) < fitting.py (`dogtl fit`), demo.py < api.py < cli/.

From Python, the stages are functions with the command line's defaults (see `dogtl.api`):
`dogtl.fit` (all of it in a time budget), `dogtl.extract_features`, `train_head`, `lr_find`, `sweep`, `finetune`, `evaluate`, `predict`.
"""

from dogtl.api import evaluate, extract_features, finetune, fit, lr_find, merge_cache, predict, sweep, train_head
from dogtl.core.errors import DogtlError
from dogtl.core.version import __version__

__all__ = ["fit", "extract_features", "merge_cache", "train_head", "lr_find", "sweep", "finetune", "evaluate",
           "predict", "DogtlError", "__version__"]
