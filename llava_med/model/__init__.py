"""Model layer: loading, prompting, image processing, generation."""
