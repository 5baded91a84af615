"""The expert lab: a local web app where the model runs (``eval.py experts serve``)."""
