"""The AlignDiff client: a Python SDK and the `aligndiff-client` command line.

from aligndiff_client import Client

with Client("http://127.0.0.1:8000", api_key) as client:
    dog = client.create_class("dog", ["dog/1.jpg"], ["dog/1.png"], num_samples=50)
    client.wait(dog.id)
    client.download_dataset(dog.id, "coco", "dog-coco.zip")
"""

from aligndiff_client._version import __version__
from aligndiff_client.archive import extract
from aligndiff_client.client import Client
from aligndiff_client.errors import (
    AlignDiffError,
    ApiError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    JobFailed,
    NotFound,
    OverQuota,
    RateLimited,
    Unauthorized,
    UnsafeArchive,
    ValidationFailed,
    WaitTimeout,
)
from aligndiff_client.models import (
    ClassInfo,
    ClassReport,
    Job,
    KeyCreated,
    KeyInfo,
    ModelInfo,
    Page,
    Sample,
    Training,
    TrainingMetrics,
)
from aligndiff_client.shots import shot_files

__all__ = [
    "AlignDiffError",
    "ApiError",
    "ClassInfo",
    "ClassReport",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "Job",
    "JobFailed",
    "KeyCreated",
    "KeyInfo",
    "ModelInfo",
    "NotFound",
    "OverQuota",
    "Page",
    "RateLimited",
    "Sample",
    "Training",
    "TrainingMetrics",
    "Unauthorized",
    "UnsafeArchive",
    "ValidationFailed",
    "WaitTimeout",
    "__version__",
    "extract",
    "shot_files",
]
