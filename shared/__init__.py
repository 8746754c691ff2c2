"""splitvlm shared library: model splitting, codecs, packet format, configuration."""

__version__ = "0.1.0"
