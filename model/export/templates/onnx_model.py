"""Triton Python-backend model running one exported ONNX encoder with onnxruntime on the CPU.

Written by `model.export.triton.write_triton_repository(..., encoder_backend="python")` for Triton
servers without the onnxruntime backend (the CPU build bundled in nvidia-pytriton has only the
Python backend). The same `model.onnx` serves under `platform: "onnxruntime_onnx"` where the
serving image has that backend (`encoder_backend="onnxruntime"`, the default: GPU clusters).
Needs only numpy and onnxruntime: no torch, no project code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        self.session = ort.InferenceSession(str(version_dir / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.input, self.output = config["input"][0]["name"], config["output"][0]["name"]

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:  # shapes differ between requests (audio lengths): one run each
            x = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy().astype(np.float32)
            y = self.session.run([self.output], {self.input: x})[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, y)]))
        return responses
