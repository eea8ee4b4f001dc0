"""LLaVA-Med serving stack: controller, model workers, web UI, CLI, Python client and launcher.

For research use only. Not for clinical use.
"""

__version__ = "0.1.0"
