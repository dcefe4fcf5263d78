"""Keep every library off the network: no update checks, telemetry or hub downloads at run time."""

import os

# Each of these libraries phones home by default; the pipeline must run on machines with no
# internet and must never fetch weights. setdefault: a user can still opt back in explicitly.
OFFLINE_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # img2dataset imports albumentations, which checks PyPI
    "HF_HUB_OFFLINE": "1",  # diffusers / open_clip: local files only
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "WANDB_MODE": "disabled",
}


def apply() -> None:
    """Set the offline defaults in this process's environment (inherited by its workers)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
