"""The paper's models: layers with their per-module streaming state and BN folding (``layers``),
the model of a config (``model``), checkpoints (``checkpoint``) and the bundled detectors
(``bundled``; their weights and model cards are the ``*.pt`` / ``*.md`` files beside this one)."""
