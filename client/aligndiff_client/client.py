"""`Client`: the AlignDiff API as Python methods.

Every request is retried on 429, 5xx and transport errors (see `retry.py`); POSTs carry an
`Idempotency-Key`, the same on every retry, so a retried POST never does the work twice.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import httpx
from pydantic import BaseModel
from tqdm import tqdm

from aligndiff_client._version import __version__
from aligndiff_client.archive import extract as extract_archive
from aligndiff_client.download import ProgressCallback, download
from aligndiff_client.errors import (
    ConnectionFailed,
    JobFailed,
    WaitTimeout,
    error_from_response,
)
from aligndiff_client.models import (
    Architecture,
    ClassInfo,
    ClassReport,
    DatasetFormat,
    Job,
    KeyCreated,
    KeyInfo,
    ModelInfo,
    Page,
    Sample,
    Training,
)
from aligndiff_client.retry import RetryPolicy, retry_after_seconds

Id = str | uuid.UUID
FileLike = str | Path | bytes
M = TypeVar("M", bound=BaseModel)
W = TypeVar("W", ClassInfo, Training)

DEFAULT_NUM_SAMPLES = 100


class SavesImage(Protocol):
    """An image that can write itself as a PNG (a PIL image), without this package needing
    Pillow."""

    def save(self, fp: Any, format: str | None = None) -> None: ...


def archive_suffix(format: str) -> str:
    """The file suffix of a dataset archive: `.tar` for webdataset, else `.zip`."""
    return ".tar" if format == "webdataset" else ".zip"


class Client:
    """A client of one AlignDiff service, authenticated with one API key.

    Use it as a context manager (or call `close()`) to release its connections. `transport`
    replaces the network (e.g. `httpx.MockTransport` in tests); `sleep` is what waits between
    retries and polls."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30,
        max_retries: int = 5,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._retry = RetryPolicy(max_retries=max_retries, sleep=sleep)
        self._http = httpx.Client(
            base_url=base_url,
            headers={
                "Authorization": f"Bearer {api_key}",
                "User-Agent": f"aligndiff-client/{__version__}",
            },
            timeout=timeout,
            transport=transport,
            # NOTE: sample blobs on S3 answer 307 to a presigned URL; httpx drops the
            # Authorization header when a redirect leaves the service's origin.
            follow_redirects=True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- classes -----------------------------------------------------------------------------

    def create_class(
        self,
        name: str,
        images: Sequence[FileLike],
        masks: Sequence[FileLike],
        *,
        prompts: Sequence[str] | None = None,
        num_samples: int = DEFAULT_NUM_SAMPLES,
        seed: int | None = None,
        bg_lambda: float | str | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> ClassInfo:
        """Upload shots (paths or bytes; `masks[i]` is the mask of `images[i]`) and queue the
        class's synthesis; return the class, `queued`. `bg_lambda`: the inversion's background
        weight in [0, 2], or "auto" to choose it by trial inversions (default: the server's).
        `model`: one of the deployment's models (`models()`; default: its first).
        The service checks the files: a bad one raises `ValidationFailed` (or `ApiError` 415)
        naming it."""
        files = [("images", _upload(f, i, "image")) for i, f in enumerate(images)]
        files += [("masks", _upload(f, i, "mask")) for i, f in enumerate(masks)]
        data: dict[str, Any] = {"name": name, "num_samples": str(num_samples)}
        if prompts:
            data["prompts"] = list(prompts)
        if seed is not None:
            data["seed"] = str(seed)
        if bg_lambda is not None:
            data["bg_lambda"] = str(bg_lambda)
        if model is not None:
            data["model"] = model
        response = self._request(
            "POST", "/v1/classes", data=data, files=files, idempotency_key=idempotency_key
        )
        return ClassInfo.model_validate_json(response.content)

    def get_class(self, class_id: Id) -> ClassInfo:
        return self._get(f"/v1/classes/{class_id}", ClassInfo)

    def list_classes(self, *, page_size: int = 50) -> Iterator[ClassInfo]:
        """Every class of the key's owner (an admin key: everyone's), newest first."""
        return self._pages("/v1/classes", ClassInfo, {"limit": page_size})

    def delete_class(self, class_id: Id) -> None:
        """Delete a class with its shots, samples and files (its job, if active, is cancelled)."""
        self._request("DELETE", f"/v1/classes/{class_id}")

    def wait(
        self,
        class_id: Id,
        *,
        timeout: float | None = None,
        poll_interval: float = 2.0,
        progress: bool = True,
    ) -> ClassInfo:
        """Poll until the class's synthesis ends; return the class, `succeeded`. Raises
        `JobFailed` if it ended `failed` or `cancelled` (with the service's error) and
        `WaitTimeout` after `timeout` seconds."""
        return self._wait(
            lambda: self.get_class(class_id),
            timeout=timeout,
            poll_interval=poll_interval,
            progress=progress,
        )

    def get_embedding(self, class_id: Id, dest: str | Path) -> Path:
        """Save the class's learned token (safetensors, for diffusers' `load_textual_inversion`)
        to `dest`. Raises `Conflict` until the inversion stage has finished."""
        response = self._request("GET", f"/v1/classes/{class_id}/embedding")
        return _write(Path(dest), response.content)

    def report(self, class_id: Id) -> ClassReport:
        """The class's report: its finished samples counted by prompt kind, mask source and
        verdict (with the rejections by reason), histograms of their scores in fixed bins, its
        acceptance thresholds and bg_lambda trials, and the key's trainings on it with their
        mIoU and baseline."""
        return self._get(f"/v1/classes/{class_id}/report", ClassReport)

    # --- samples and datasets ----------------------------------------------------------------

    def samples(
        self,
        class_id: Id,
        *,
        accepted: bool | None = None,
        min_clip_score: float | None = None,
        page_size: int = 200,
    ) -> Iterator[Sample]:
        """Every finished sample of the class, in index order, fetched a page at a time."""
        params: dict[str, Any] = {"limit": page_size}
        if accepted is not None:
            params["accepted"] = _bool(accepted)
        if min_clip_score is not None:
            params["min_clip_score"] = min_clip_score
        return self._pages(f"/v1/classes/{class_id}/samples", Sample, params)

    def download_sample_image(self, sample: Sample | Id, dest: str | Path | None = None) -> bytes:
        """A sample's image (PNG bytes), also written to `dest` when given."""
        return self._sample_blob(sample, "image", dest)

    def download_sample_mask(self, sample: Sample | Id, dest: str | Path | None = None) -> bytes:
        """A sample's final mask (PNG bytes), also written to `dest` when given."""
        return self._sample_blob(sample, "mask", dest)

    def review_sample(self, sample: Sample | Id, *, accepted: bool) -> Sample:
        """Accept or reject a finished sample: your verdict overrides the acceptance filters'
        (`accepted_by` "user"; `rejected_by` "user" when rejected). The class's
        `num_accepted`, its report, its `accepted_only` datasets and later trainings follow
        it. Return the sample as it is now."""
        response = self._request(
            "PATCH", f"/v1/samples/{_sample_id(sample)}", json={"accepted": accepted}
        )
        return Sample.model_validate_json(response.content)

    def replace_mask(self, sample: Sample | Id, mask: FileLike | SavesImage) -> Sample:
        """Replace a finished sample's mask with one you drew: a path, PNG bytes or a PIL
        image, of the sample's size, foreground where the gray value is >= 128. The service
        checks it as it checks a shot's mask (a bad one raises `ValidationFailed`, or
        `ApiError` 415 for a file that is not a PNG). Return the sample, its `mask_source`
        "human" and its `instances` counted in the new mask."""
        if not isinstance(mask, str | Path | bytes):
            buffer = BytesIO()
            mask.save(buffer, format="PNG")
            mask = buffer.getvalue()
        response = self._request(
            "PUT",
            f"/v1/samples/{_sample_id(sample)}/mask",
            files=[("mask", _upload(mask, 0, "mask"))],
        )
        return Sample.model_validate_json(response.content)

    def download_dataset(
        self,
        class_id: Id | Sequence[Id],
        format: DatasetFormat = "voc",
        dest: str | Path | None = None,
        *,
        accepted_only: bool = True,
        val: str = "none",
        progress: bool = True,
        extract: str | Path | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Download the class's dataset archive (zip; tar for webdataset) to `dest` (default:
        `<class_id>-<format>.zip|tar` in the current folder) and return its path.

        Given several class ids (a list), one archive over those classes, labelled in that
        order (`GET /v1/datasets`; default `dest`: `<first id>-and-<n>-more-<format>.zip|tar`).
        `val` splits off validation data: `none`, `shots` (the real shots) or `fraction:<f>`
        (that share of the samples, chosen by their ids).

        The download streams to `<dest>.incomplete` and resumes where an interrupted one
        stopped, if the archive has not changed since. With `extract`, the archive is then
        unpacked into that folder, refusing unsafe entries (see `archive.extract`).
        `on_progress(bytes_so_far, total_or_None)` is called after each chunk; an exception
        it raises stops the download, leaving the `.incomplete` file to resume from."""
        params = {"format": format, "accepted_only": _bool(accepted_only), "val": val}
        if isinstance(class_id, str | uuid.UUID):
            url, stem = f"/v1/classes/{class_id}/dataset", str(class_id)
        else:
            ids = [str(one) for one in class_id]
            url, params["class_ids"] = "/v1/datasets", ",".join(ids)
            stem = f"{ids[0]}-and-{len(ids) - 1}-more" if len(ids) > 1 else "".join(ids)
        target = Path(dest or f"{stem}-{format}{archive_suffix(format)}")
        download(
            self._http,
            url,
            target,
            retry=self._retry,
            params=params,
            progress=progress,
            on_progress=on_progress,
        )
        if extract is not None:
            extract_archive(target, extract)
        return target

    # --- jobs --------------------------------------------------------------------------------

    def jobs(
        self, *, status: str | None = None, kind: str | None = None, page_size: int = 50
    ) -> Iterator[Job]:
        """Every job of the key's owner (an admin key: everyone's), newest first."""
        params: dict[str, Any] = {"limit": page_size}
        if status is not None:
            params["status"] = status
        if kind is not None:
            params["kind"] = kind
        return self._pages("/v1/jobs", Job, params)

    def get_job(self, job_id: Id) -> Job:
        return self._get(f"/v1/jobs/{job_id}", Job)

    def cancel_job(self, job_id: Id, *, idempotency_key: str | None = None) -> Job:
        """Ask a queued or running job to stop (it ends `cancelled` within one batch).
        Raises `Conflict` once the job has finished."""
        return self._post(f"/v1/jobs/{job_id}/cancel", Job, idempotency_key=idempotency_key)

    def retry_job(self, job_id: Id, *, idempotency_key: str | None = None) -> Job:
        """Queue a failed or cancelled job again, keeping the work it already stored.
        Raises `Conflict` for a job in any other state."""
        return self._post(f"/v1/jobs/{job_id}/retry", Job, idempotency_key=idempotency_key)

    # --- trainings ---------------------------------------------------------------------------

    def train(
        self,
        class_ids: Iterable[Id],
        *,
        architecture: Architecture = "deeplabv3",
        steps: int | None = None,
        batch_size: int | None = None,
        use_synthetic: bool = True,
        copy_paste: bool = True,
        compare_baseline: bool = False,
        validation_images: Sequence[FileLike] | None = None,
        validation_masks: Sequence[FileLike] | None = None,
        idempotency_key: str | None = None,
    ) -> Training:
        """Queue the training of a segmenter on the classes' shots (and samples, with
        `use_synthetic`); return the training, `queued`. `steps` and `batch_size` left out
        take the service's defaults.

        With a validation set (`validation_masks[i]` is the label map of
        `validation_images[i]`: a single-channel PNG, 0 background, k the k-th class of
        `class_ids`, 255 ignored) the training is measured on it rather than on the shots;
        the service checks the files and a bad one raises `ValidationFailed` naming it."""
        body: dict[str, Any] = {
            "class_ids": [str(c) for c in class_ids],
            "architecture": architecture,
            "use_synthetic": use_synthetic,
            "copy_paste": copy_paste,
            "compare_baseline": compare_baseline,
        }
        if steps is not None:
            body["steps"] = steps
        if batch_size is not None:
            body["batch_size"] = batch_size
        if validation_images is None and validation_masks is None:
            return self._post("/v1/trainings", Training, json=body, idempotency_key=idempotency_key)
        files = [
            ("val_images", _upload(f, i, "image")) for i, f in enumerate(validation_images or [])
        ]
        files += [
            ("val_masks", _upload(f, i, "mask")) for i, f in enumerate(validation_masks or [])
        ]
        response = self._request(
            "POST",
            "/v1/trainings",
            data={"request": json.dumps(body)},
            files=files,
            idempotency_key=idempotency_key,
        )
        return Training.model_validate_json(response.content)

    def get_training(self, training_id: Id) -> Training:
        return self._get(f"/v1/trainings/{training_id}", Training)

    def list_trainings(self, *, page_size: int = 50) -> Iterator[Training]:
        """Every training of the key's owner (an admin key: everyone's), newest first."""
        return self._pages("/v1/trainings", Training, {"limit": page_size})

    def download_weights(
        self,
        training_id: Id,
        dest: str | Path | None = None,
        *,
        progress: bool = True,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Download the trained segmenter (a zip of `model.safetensors` and `config.json`) to
        `dest` (default: `<training_id>-weights.zip` in the current folder) and return its
        path. Streamed to `<dest>.incomplete` like `download_dataset`. Raises `Conflict` until
        the training has succeeded."""
        target = Path(dest or f"{training_id}-weights.zip")
        download(
            self._http,
            f"/v1/trainings/{training_id}/weights",
            target,
            retry=self._retry,
            progress=progress,
            on_progress=on_progress,
        )
        return target

    def predict(self, training_id: Id, image: FileLike, dest: str | Path | None = None) -> bytes:
        """Segment an image (a path or bytes: JPEG, PNG or WEBP) with the trained segmenter,
        on the service's worker; return the label mask (PNG bytes, the image's size: 0
        background, k the k-th of the training's classes), also written to `dest` when given.
        Raises `Conflict` until the training has succeeded."""
        response = self._request(
            "POST",
            f"/v1/trainings/{training_id}/predict",
            files=[("image", _upload(image, 0, "image"))],
        )
        if dest is not None:
            _write(Path(dest), response.content)
        return response.content

    def wait_training(
        self,
        training_id: Id,
        *,
        timeout: float | None = None,
        poll_interval: float = 5.0,
        progress: bool = True,
    ) -> Training:
        """Like `wait`, for a training."""
        return self._wait(
            lambda: self.get_training(training_id),
            timeout=timeout,
            poll_interval=poll_interval,
            progress=progress,
        )

    # --- keys --------------------------------------------------------------------------------

    def create_key(
        self,
        name: str,
        *,
        admin: bool = False,
        owner_id: Id | None = None,
    ) -> KeyCreated:
        """Create an API key; its secret (`.key`) is in this answer only. A user key creates
        keys for its own owner (`Forbidden` for another owner or `admin=True`); an admin key
        may name any `owner_id` (or none: a new owner) and may create admin keys.

        Unlike other POSTs, the service does not replay this one by its `Idempotency-Key` (a
        replay would need the secret, which it does not keep): if an answer is lost and the
        request retried, a second key is made, and the first, whose secret nobody saw, is
        listed with `last_used_at` None, to be revoked."""
        body: dict[str, Any] = {"name": name, "admin": admin}
        if owner_id is not None:
            body["owner_id"] = str(owner_id)
        return self._post("/v1/keys", KeyCreated, json=body)

    def list_keys(self, *, page_size: int = 50) -> Iterator[KeyInfo]:
        """Every key of the key's owner (an admin key: everyone's), without their secrets."""
        return self._pages("/v1/keys", KeyInfo, {"limit": page_size})

    def revoke_key(self, key_id: Id) -> None:
        """Revoke a key: within the service's auth cache time (seconds) every request with it
        answers 401, and its dashboard sessions end."""
        self._request("DELETE", f"/v1/keys/{key_id}")

    # --- models ------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """The deployment's diffusion models, the default (a class's when it names none)
        first."""
        body = self._request("GET", "/v1/models").json()
        return [ModelInfo.model_validate(item) for item in body["items"]]

    # --- plumbing ----------------------------------------------------------------------------

    def _get(self, path: str, model: type[M]) -> M:
        return model.model_validate_json(self._request("GET", path).content)

    def _post(
        self,
        path: str,
        model: type[M],
        *,
        json: Any = None,
        idempotency_key: str | None = None,
    ) -> M:
        response = self._request("POST", path, json=json, idempotency_key=idempotency_key)
        return model.model_validate_json(response.content)

    def _pages(self, path: str, model: type[M], params: Mapping[str, Any]) -> Iterator[M]:
        cursor: str | None = None
        while True:
            query = {**params, "cursor": cursor} if cursor else dict(params)
            response = self._request("GET", path, params=query)
            page = Page[model].model_validate_json(response.content)  # type: ignore[valid-type]
            yield from page.items
            cursor = page.next_cursor
            if not cursor:
                return

    def _sample_blob(self, sample: Sample | Id, which: str, dest: str | Path | None) -> bytes:
        content = self._request("GET", f"/v1/samples/{_sample_id(sample)}/{which}").content
        if dest is not None:
            _write(Path(dest), content)
        return content

    def _wait(
        self,
        fetch: Callable[[], W],
        *,
        timeout: float | None,
        poll_interval: float,
        progress: bool,
    ) -> W:
        deadline = None if timeout is None else time.monotonic() + timeout
        with tqdm(total=100, unit="%", disable=not progress, bar_format=_WAIT_BAR) as bar:
            while True:
                resource = fetch()
                stage = getattr(resource, "stage", None)
                bar.set_description_str(f"{resource.status} {stage}" if stage else resource.status)
                bar.update(round(resource.progress * 100) - bar.n)
                if resource.status == "succeeded":
                    return resource
                if resource.finished:
                    raise JobFailed(resource)
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(resource, timeout or 0)
                self._retry.sleep(poll_interval)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Mapping[str, Any] | None = None,
        files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        """Send a request, retrying as the policy says; return the successful answer or raise
        the error answer as an `ApiError` (or `ConnectionFailed`)."""
        headers = {}
        if method == "POST":
            headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        failures = 0
        while True:
            response: httpx.Response | None = None
            error: httpx.TransportError | None = None
            try:
                response = self._http.request(
                    method, path, params=params, json=json, data=data, files=files, headers=headers
                )
            except httpx.TransportError as exc:
                error = exc
            # NOTE: a retried DELETE whose first try was done (its answer lost) finds nothing
            # to delete: gone is what was asked for.
            retried_delete_gone = method == "DELETE" and failures > 0
            if response is not None and (
                response.is_success or (retried_delete_gone and response.status_code == 404)
            ):
                return response
            delay = self._retry.delay(failures, response)
            if delay is None:
                if response is not None:
                    raise error_from_response(response, retry_after=retry_after_seconds(response))
                url = str(self._http.base_url).rstrip("/") + path
                raise ConnectionFailed(
                    f"{method} {url} failed after {failures + 1} tries: {error}"
                ) from error
            self._retry.sleep(delay)
            failures += 1


_WAIT_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]"


def _upload(file: FileLike, index: int, kind: str) -> tuple[str, bytes, str]:
    """A multipart file part; read now, so that every retry sends the same bytes."""
    if isinstance(file, bytes):
        name = f"{kind}-{index}.png" if kind == "mask" else f"{kind}-{index}"
        return name, file, "application/octet-stream"
    path = Path(file)
    return path.name, path.read_bytes(), "application/octet-stream"


def _sample_id(sample: Sample | Id) -> Id:
    return sample.id if isinstance(sample, Sample) else sample


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _write(dest: Path, content: bytes) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(content)
    return dest
