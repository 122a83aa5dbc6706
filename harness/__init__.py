"""LoRI continual-learning harness: train adapters on task sequences, measure forgetting."""

import os

# Telemetry off unless the user explicitly turned it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLflow prints INFO lines (table creation, migrations) on every store open.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

__version__ = "0.1.0"
