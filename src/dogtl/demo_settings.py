"""The demo's settings, declared once (see core/settings.py): `DemoConfig`, the `dogtl demo`
options and `dogtl.api.demo`'s defaults come from DEMO_SETTINGS. Apart from demo.py, which
imports every stage, so that `dogtl --help` need not.
"""

from __future__ import annotations

from dogtl.core.settings import Setting, settings_class
from dogtl.core.backbones import backbone_help

DEMO_SETTINGS = (
    Setting("dir", "path", "demo", "Folder for the demo's data, cache, models, reports and submission.",
            cli_names=("--dir",)),
    Setting("backbone", "str", "xception", "Backbone to demonstrate. " + backbone_help()),
    Setting("image_size", "int", 71, "Small input size so the demo runs in minutes on a CPU."),
    Setting("weights", "str", "auto", "'auto' (ImageNet if it can be downloaded, else random initialisation), "
            "'imagenet', 'none' or PATH."),
    Setting("classes", "int", 4, "Classes of the generated data set.", cli=False),
    Setting("per_class", "int", 16, "Generated training images per class.", cli=False),
    Setting("test_images", "int", 8, "Generated test images.", cli=False),
    Setting("source_size", "int", 96, "Pixels of the generated JPEGs.", cli=False),
    Setting("passes", "int", 2, "Augmented passes extracted.", cli=False),
    Setting("head_epochs", "int", 100, "Head epochs (seconds: the head trains on cached features).", cli=False),
    Setting("finetune_epochs", "int", 2, "Fine-tuning epochs.", cli=False),
    Setting("batch_size", "int", 16, "Images per step at every stage.", cli=False),
    Setting("force", "bool", False, "Redo a demo already in --dir (replaces its data, cache, models, reports).",
            cli_names=("--force",)),
)

DemoConfig = settings_class("DemoConfig", DEMO_SETTINGS, "The demo's settings (DEMO_SETTINGS): small, so it runs "
                            "in minutes on a CPU.", {"__module__": __name__})
