"""dogtl: transfer learning with cached frozen-backbone features."""

__version__ = "0.1.0"
