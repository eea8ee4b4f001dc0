"""Serving layer: controller, model workers, clients and UIs."""
