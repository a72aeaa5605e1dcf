"""The shared decoder (`transformer.py`) built from one set of layers (`layers.py`)."""
