"""Classes: creating one from uploaded shots (which queues its synthesis job), reading,
listing and deleting them, and the learned embedding."""

from __future__ import annotations

import functools
import logging
import secrets
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session

from aligndiff.masks import mask_to_image
from aligndiff.names import PROMPT_STYLE, find_name, inversion_token
from aligndiff.settings import AUTO
from aligndiff.shots import Shot, ShotError, ShotFormatError, load_shot
from aligndiff.token_budget import TokenBudget, TokenizerUnavailable
from service.auth import Principal
from service.background_cpu import at_low_priority
from service.contexts import jobs, quotas
from service.contexts.access import owner_param, visible_to, visible_to_any
from service.contexts.idempotency import Answer, claim_for, commit_with_answer, find_answer
from service.contexts.idempotency import fingerprint as request_fingerprint
from service.contexts.job_control import Accepted, StartTask
from service.contexts.uploads import Upload, display_name, file_digests
from service.models import Job, SegClass, Training
from service.models import Shot as ShotRow
from service.pagination import (
    newest_first_after,
    newest_first_bound,
    newest_first_cursor,
    newest_first_params,
    split_page,
)
from service.problems import Problem, not_found
from service.queue import synthesis_queue
from service.reads import Query, ReadDatabase
from service.schemas import MAX_SEED, ClassCreate, ClassPublic
from service.settings import Settings
from service.storage import Storage, class_prefix, delete_prefix_quietly, png_bytes, shot_key

log = logging.getLogger(__name__)

SYNTHESIS = "synthesis"
PNG = "image/png"


def create_class(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    owner_id: uuid.UUID,
    class_in: ClassCreate,
    images: Sequence[Upload],
    masks: Sequence[Upload],
    idempotency_key: str | None,
    location_of: Callable[[uuid.UUID], str],
    quota_exempt: bool = False,
) -> Accepted:
    """Check the shots, store them, and record the class with its queued synthesis job.

    Nothing is kept from a request that fails: the shots are all checked before anything is
    written; blobs are written before the rows that name them and deleted again when the rows
    cannot be committed. The caller starts the job (`job_control.start_job`) afterwards.
    Invalid fields or shots answer 422, files of a type other than JPEG/PNG/WEBP images and
    PNG masks 415, each with the fields concerned (`images[0]`, `masks[1]`, …); a name or a
    prompt too long for the text encoder is an invalid field. Over one of the owner's quotas
    (`service.contexts.quotas`; not for `quota_exempt`) answers 429. The class's prompts are
    worded in the current style (`aligndiff.names.PROMPT_STYLE`), which it keeps.
    """
    claim = claim_for(owner_id, idempotency_key, _fingerprint(class_in, images, masks))
    if (replay := find_answer(session, claim)) is not None:
        return Accepted(replay, start=None)

    name = class_in.name.strip()
    model = class_in.model or settings.default_model
    _check_fields(class_in, name=name, images=images, masks=masks, settings=settings)
    quotas.check_samples(settings, num_samples=class_in.num_samples, exempt=quota_exempt)
    upload_bytes = sum(len(upload.data) for upload in (*images, *masks))
    demand = quotas.JobDemand(owner_id, exempt=quota_exempt, upload_bytes=upload_bytes)
    quotas.enforce(session, settings, demand, lock=False)
    # NOTE: decoding and storing the shots takes a while; the connection goes back to the
    # pool meanwhile rather than sit idle in a transaction.
    session.rollback()
    shots = at_low_priority(_load_shots, images, masks, settings=settings)

    class_id = uuid.uuid4()
    try:
        shot_rows = at_low_priority(
            _store_shots, storage, class_id, shots, images=images, masks=masks
        )
        # Again, under the owner's lock, in the transaction that adds the job.
        quotas.enforce(session, settings, demand)
        job = jobs.create_job(session, kind=SYNTHESIS, owner_id=owner_id, target_id=class_id)
        seg_class = SegClass(
            id=class_id,
            owner_id=owner_id,
            name=name,
            seed=secrets.randbelow(MAX_SEED + 1) if class_in.seed is None else class_in.seed,
            prompts=list(class_in.prompts),
            prompt_style=PROMPT_STYLE,
            bg_lambda=_fixed_bg_lambda(class_in, settings),
            bg_lambda_auto=class_in.bg_lambda == AUTO,
            num_shots=len(shots),
            num_samples_requested=class_in.num_samples,
            job_id=job.id,
            upload_bytes=upload_bytes,
            model=model,
        )
        session.add(seg_class)
        session.add_all(shot_rows)
        session.flush()
        body = class_public(seg_class, job, default_model=model).model_dump_json()
        answer = commit_with_answer(session, claim, Answer(202, body, location_of(class_id)))
    except BaseException:
        session.rollback()
        delete_prefix_quietly(storage, class_prefix(class_id))
        raise
    if answer.replayed:
        # A concurrent request with the same Idempotency-Key won: this one's rows were rolled
        # back, and its blobs go too.
        delete_prefix_quietly(storage, class_prefix(class_id))
        return Accepted(answer, start=None)
    return Accepted(answer, start=StartTask(SYNTHESIS, job.id, queue=synthesis_queue(model)))


@functools.cache
def _class_reads(*, admin: bool, one: bool, after: bool) -> Query:
    """The statement of a class read (`one`: by the bind parameter `class_id`) or of a page
    of classes, newest first; compiled once per combination."""
    statement = select(*_SHOWN).outerjoin(Job, Job.id == SegClass.job_id)
    statement = statement.where(visible_to_any(admin, SegClass.owner_id))
    if one:
        return statement.where(SegClass.id == bindparam("class_id"))
    return newest_first_bound(
        statement, created_at=SegClass.created_at, id_=SegClass.id, after=after
    )


async def list_classes(
    *,
    reads: ReadDatabase,
    principal: Principal,
    limit: int,
    cursor: str | None,
    default_model: str,
) -> dict[str, Any]:
    """The classes `principal` may see, newest first, as a `Page[ClassPublic]`'s fields."""
    after = newest_first_after(cursor)
    statement = _class_reads(admin=principal.is_admin, one=False, after=after is not None)
    params = {**newest_first_params(after, limit), **owner_param(principal)}
    rows, next_cursor = split_page(
        await reads.rows(statement, params),
        limit=limit,
        cursor_after=lambda row: newest_first_cursor(row[_CREATED_AT], row[_ID]),
    )
    return {
        "items": [_class_fields(row, default_model) for row in rows],
        "next_cursor": next_cursor,
    }


async def get_class(
    *, reads: ReadDatabase, principal: Principal, class_id: uuid.UUID, default_model: str
) -> dict[str, Any]:
    """A class as `ClassPublic`'s fields; 404 unless `principal` may see it."""
    statement = _class_reads(admin=principal.is_admin, one=True, after=False)
    rows = await reads.rows(statement, {"class_id": class_id, **owner_param(principal)})
    if not rows:
        raise not_found("class")
    return _class_fields(rows[0], default_model)


def delete_class(
    *, session: Session, storage: Storage, principal: Principal, class_id: uuid.UUID
) -> None:
    """Delete a class: cancel its job if still active, delete its rows (its shots and samples
    go with it) and then its blobs. The job row stays, `cancelled` if it was active, as the
    record of the work done. Queued or running trainings on the class (its owner's, or an
    admin's) are cancelled too, with the reason as their job's error; finished ones keep their
    weights."""
    seg_class, job = visible_class(session, principal, class_id)
    if job is not None and job.status in jobs.ACTIVE:
        # It may finish between the read and the cancel: then there is nothing to stop.
        with suppress(Problem):
            jobs.request_cancel(session, job)
    session.delete(seg_class)
    # NOTE: the DELETE is flushed before the trainings are read: a training being created on
    # this class reads its row FOR SHARE, so either it commits first (and is found below) or
    # it finds the class gone.
    session.flush()
    _cancel_trainings_on(session, class_id=class_id)
    session.commit()
    # NOTE: blobs go after the commit: a blob without a row is harmless, a row without its blob
    # is a broken resource. Should this fail, the class is still deleted as asked and the
    # orphaned blobs are logged.
    delete_prefix_quietly(storage, class_prefix(class_id))


def _cancel_trainings_on(session: Session, *, class_id: uuid.UUID) -> None:
    """Cancel the queued or running trainings that use class `class_id`, whoever owns them (an
    admin may train on any owner's class)."""
    # NOTE: unfinished trainings are few (each waits for a GPU, and users' are capped by the job
    # quota), so they are read whole rather than searched inside the JSON column.
    active = session.execute(
        select(Training.class_ids, Job)
        .join(Job, Job.id == Training.job_id)
        .where(Job.status.in_(jobs.ACTIVE))
    ).all()
    reason = f"cancelled: class {class_id}, which it trains on, was deleted"
    for class_ids, training_job in active:
        if str(class_id) in class_ids:
            # It may finish between the read and the cancel: then it keeps what it made.
            with suppress(Problem):
                jobs.request_cancel(session, training_job, reason=reason)


def embedding_blob(
    *, session: Session, principal: Principal, class_id: uuid.UUID
) -> tuple[str, str]:
    """The blob key of a class's learned embedding and a file name for it; 409 until the
    inversion stage has stored it."""
    seg_class, _ = visible_class(session, principal, class_id)
    if seg_class.embedding_key is None:
        raise Problem(409, "the class's embedding is not learned yet; wait for its job")
    return seg_class.embedding_key, f"{inversion_token(seg_class.name).strip('<>')}.safetensors"


# What `ClassPublic` shows, in its order: the class's columns and its job's state.
_SHOWN = (
    SegClass.id, SegClass.name, Job.status, Job.stage, Job.progress, SegClass.num_shots,
    SegClass.num_samples_requested, SegClass.num_samples_done, SegClass.num_accepted,
    SegClass.clip_score_mean, SegClass.model, SegClass.bg_lambda, SegClass.tuning,
    SegClass.job_id, Job.error, SegClass.created_at, SegClass.updated_at,
)  # fmt: skip
_NAMES = tuple(column.key for column in _SHOWN)
_ID, _CREATED_AT = _NAMES.index("id"), _NAMES.index("created_at")


def _class_fields(row: Sequence[Any], default_model: str) -> dict[str, Any]:
    """`ClassPublic`'s fields from a row of `_SHOWN`: the state is its job's (a class without
    one yet is queued); a class stored before models were named shows `default_model`."""
    fields = dict(zip(_NAMES, row, strict=True))
    if fields["status"] is None:
        fields["status"], fields["progress"] = "queued", 0.0
    fields["model"] = fields["model"] or default_model
    return fields


def class_public(seg_class: SegClass, job: Job | None, *, default_model: str) -> ClassPublic:
    """A class as the API shows it (see `_class_fields`)."""
    row = [
        getattr(job, column.key, None) if column.class_ is Job else getattr(seg_class, column.key)
        for column in _SHOWN
    ]
    return ClassPublic(**_class_fields(row, default_model))


def _fixed_bg_lambda(class_in: ClassCreate, settings: Settings) -> float | None:
    """The λ_bg a class is inverted with when it is fixed (None: `auto` chooses it)."""
    if class_in.bg_lambda == AUTO:
        return None
    return settings.bg_lambda if class_in.bg_lambda is None else class_in.bg_lambda


@functools.cache
def _class_exists(*, admin: bool) -> Query:
    return select(SegClass.id).where(
        SegClass.id == bindparam("class_id"), visible_to_any(admin, SegClass.owner_id)
    )


async def visible_class_exists(
    reads: ReadDatabase, principal: Principal, class_id: uuid.UUID
) -> None:
    """Raise 404 unless `principal` may see the class."""
    statement = _class_exists(admin=principal.is_admin)
    if not await reads.rows(statement, {"class_id": class_id, **owner_param(principal)}):
        raise not_found("class")


def _classes_with_jobs() -> Select[SegClass, Job]:
    return select(SegClass, Job).outerjoin(Job, Job.id == SegClass.job_id)


def visible_class(
    session: Session, principal: Principal, class_id: uuid.UUID
) -> tuple[SegClass, Job | None]:
    """The class and its job (None if it has none), or 404 unless `principal` may see it."""
    row = (
        session.execute(
            _classes_with_jobs().where(
                SegClass.id == class_id, visible_to(principal, SegClass.owner_id)
            )
        )
        .tuples()
        .one_or_none()
    )
    if row is None:
        raise not_found("class")
    return row


def _fingerprint(class_in: ClassCreate, images: Sequence[Upload], masks: Sequence[Upload]) -> str:
    # NOTE: a request naming no model keeps the fingerprint it had before classes had one, so
    # a retry across the upgrade still replays its first answer.
    fields = {
        **class_in.model_dump(exclude={"model"} if class_in.model is None else None),
        "images": file_digests(images),
        "masks": file_digests(masks),
    }
    return request_fingerprint("create_class", fields)


def _check_fields(
    class_in: ClassCreate,
    *,
    name: str,
    images: Sequence[Upload],
    masks: Sequence[Upload],
    settings: Settings,
) -> None:
    """The checks that need no decoding: the name, counts and prompts (422), and that every
    prompt the job will encode fits the text encoder (`_token_errors`)."""
    errors = []
    if not name:
        errors.append({"field": "name", "message": "must not be blank"})
    served = settings.served_models
    if class_in.model is not None and class_in.model not in served:
        errors.append(
            {
                "field": "model",
                "message": f"unknown model {class_in.model!r}: this deployment serves "
                f"{', '.join(served)}",
            }
        )
    if class_in.num_samples > settings.max_num_samples:
        errors.append(
            {
                "field": "num_samples",
                "message": f"must be at most {settings.max_num_samples} on this server",
            }
        )
    if len(images) > settings.max_shots:
        errors.append(
            {
                "field": "images",
                "message": f"at most {settings.max_shots} images, got {len(images)}",
            }
        )
    if len(masks) != len(images):
        errors.append(
            {
                "field": "masks",
                "message": f"{len(masks)} masks for {len(images)} images; send one mask per "
                "image, in the same order",
            }
        )
    if name:
        for index, prompt in enumerate(class_in.prompts):
            try:
                find_name(prompt, name)
            except ValueError:
                errors.append(
                    {
                        "field": f"prompts[{index}]",
                        "message": f"must mention the class name {name!r}: the sample's mask "
                        "is read from the attention to those words",
                    }
                )
        spec = served.get(class_in.model or settings.default_model)
        if spec is not None:
            errors += _token_errors(name, class_in.prompts, model_spec=spec)
    if errors:
        raise Problem(422, "the request is not valid", errors=errors)


def _token_errors(name: str, prompts: Sequence[str], *, model_spec: str) -> list[dict[str, str]]:
    """A `name` error when the class's template prompts, and a `prompts[i]` error for each
    user prompt, take more tokens than the text encoder reads: counted as the workers will
    tokenize them, with the deployment's tokenizer (`aligndiff.token_budget`), so that a job
    never fails on them after its inversion was spent."""
    try:
        budget = TokenBudget.for_model(model_spec)
    except TokenizerUnavailable as error:
        # NOTE: not counted, rather than every upload refused: an API that cannot read the
        # model's tokenizer (a folder only the workers mount, a hub it cannot reach) must not
        # stop classes from being created, and the workers still refuse a prompt too long.
        log.warning("prompts' tokens not counted at upload: %s", error)
        return []
    errors = []
    for overrun in budget.overruns(name, prompts, style=PROMPT_STYLE):
        limit = (
            f"the text encoder reads at most {overrun.limit} (its context less the start and "
            "end of text)"
        )
        if overrun.user_prompt is None:
            errors.append(
                {
                    "field": "name",
                    "message": f"is too long for the model: the prompt {overrun.prompt!r} "
                    f"takes {overrun.tokens} tokens, and {limit}",
                }
            )
        else:
            errors.append(
                {
                    "field": f"prompts[{overrun.user_prompt}]",
                    "message": f"takes {overrun.tokens} tokens, and {limit}",
                }
            )
    return errors


def _load_shots(
    images: Sequence[Upload], masks: Sequence[Upload], *, settings: Settings
) -> list[Shot]:
    """Decode and check every pair, reporting every bad file at once: 415 when a file is of
    a type that is not accepted, else 422."""
    shots, errors, wrong_type = [], [], False
    for position, (image, mask) in enumerate(zip(images, masks, strict=True)):
        try:
            shots.append(
                load_shot(
                    image.data,
                    mask.data,
                    stem=str(position),
                    max_pixels=settings.max_image_pixels,
                    image_source=f"images[{position}]",
                    mask_source=f"masks[{position}]",
                )
            )
        except ShotError as error:
            wrong_type = wrong_type or isinstance(error, ShotFormatError)
            errors.append({"field": error.source, "message": error.detail})
    if wrong_type:
        raise Problem(
            415,
            "an uploaded file is not of an accepted type: images must be JPEG, PNG or WEBP, "
            "masks PNG",
            errors=errors,
        )
    if errors:
        raise Problem(422, "the uploaded shots are not valid", errors=errors)
    return shots


def _store_shots(
    storage: Storage,
    class_id: uuid.UUID,
    shots: Sequence[Shot],
    *,
    images: Sequence[Upload],
    masks: Sequence[Upload],
) -> list[ShotRow]:
    """Write each shot's original files and normalized PNGs (RGB image, 0/255 mask); return
    the rows that name them, not yet added to a session."""
    rows = []
    for position, (shot, upload, mask_upload) in enumerate(zip(shots, images, masks, strict=True)):
        original_key = shot_key(class_id, position, "original-image")
        original_mask_key = shot_key(class_id, position, "original-mask.png")
        image_key = shot_key(class_id, position, "image.png")
        mask_key = shot_key(class_id, position, "mask.png")
        storage.put(original_key, upload.data, content_type="application/octet-stream")
        storage.put(original_mask_key, mask_upload.data, content_type=PNG)
        storage.put(image_key, png_bytes(shot.image), content_type=PNG)
        storage.put(mask_key, png_bytes(mask_to_image(shot.mask)), content_type=PNG)
        rows.append(
            ShotRow(
                class_id=class_id,
                position=position,
                filename=display_name(upload.filename, fallback=f"shot-{position:02d}"),
                width=shot.image.width,
                height=shot.image.height,
                original_key=original_key,
                original_mask_key=original_mask_key,
                image_key=image_key,
                mask_key=mask_key,
            )
        )
    return rows
