"""Export a trained U-Net to ONNX, to run it without PyTorch (onnxruntime, other languages).

    export_onnx("runs/unet/best.pt", "model.onnx")  # or: unet-seg export model.onnx --checkpoint best.pt

The ONNX model takes "image" (B, C, S, S), normalised as seg_utils.network_input does, and gives
"logits" (B, 1, S, S); the Preprocess it needs is stored in its metadata. onnx and onnxruntime
are imported only here.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

import seg_utils as su
from seg_files import DataError, check_path
from seg_runs import write_atomically


@contextmanager
def _quiet_export():
    """Hide torch.onnx's chatter (deprecations, skipped ops) for one export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model, out_path, overwrite: bool = False) -> Path:
    """Write the model file's U-Net as ONNX (fp32, dynamic batch), atomically, over an existing
    file only with `overwrite`, never over the model file."""
    named, out_path = str(out_path), check_path(out_path, "ONNX file")
    if os.path.realpath(out_path) == os.path.realpath(model):  # realpath: no error on a loop
        raise DataError(f"{out_path} is the model file itself: name the ONNX file, e.g. model.onnx")
    if out_path.is_dir() or named.endswith(("/", os.sep)):  # "model/" would write "model"
        raise DataError(f"{named} is a folder: name the file, e.g. {out_path / 'model.onnx'}")
    if out_path.exists() and not overwrite:
        raise DataError(
            f"{out_path} already exists: choose another name, or pass --overwrite "
            "(overwrite=True) to replace it"
        )
    segmenter = su.load_segmenter(model, device=torch.device("cpu"))
    if len(segmenter.nets) != 1:
        raise DataError(f"{model} holds {len(segmenter.nets)} networks: export one network's file")
    net, pre = segmenter.nets[0].float(), segmenter.pres[0]
    net = net.to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, len(pre.channels), pre.size, pre.size)  # batch 2: not specialised
    names = dict(input_names=["image"], output_names=["logits"], verbose=False)
    batch = {"x": {0: torch.export.Dim("batch")}}  # any batch size
    try:
        with _quiet_export():
            program = torch.onnx.export(net, (example,), dynamic_shapes=batch, **names)
    except ImportError as e:
        needs = "ONNX export needs onnx and onnxscript: pip install -r requirements.txt"
        raise ImportError(needs) from e
    program.model.metadata_props["seg_utils.preprocess"] = json.dumps(asdict(pre))
    model_bytes = program.model_proto.SerializeToString()  # weights inside: no external data file
    try:
        write_atomically(out_path, lambda f: f.write(model_bytes))
    except OSError as e:  # a read-only folder, a full disk
        raise DataError(
            f"writing {out_path} failed ({e}): check that path, its permissions and the free space"
        ) from e
    return out_path


def onnx_session(path):
    """An onnxruntime CPU session for an exported model."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("running ONNX needs onnxruntime: pip install -r requirements.txt") from e
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
