"""Root conftest: pytest reads command-line options only from here (or a plugin)."""
import os

# Offline by default: nothing in the suite may reach a hub at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
