"""unlearnopt: fast, exact machine unlearning for large language and multimodal models."""

__version__ = "0.1.0"
