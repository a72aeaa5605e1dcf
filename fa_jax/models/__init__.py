"""The decoder: its parameter table (`spec.py`), the array math (`layers.py`), the Flax modules built from them
(`modules.py`) and the functional API on top (`transformer.py`)."""
