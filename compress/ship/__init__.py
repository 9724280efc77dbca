"""Shipping: a variant turned into the files an edge team runs, each checked in its own runtime.

- ``convert``: torch -> ONNX and TorchScript, the one way every ONNX file is made;
- ``files``: one checked file per format (checker, shape inference, parity with the source);
- ``variant``: one variant exported to every format the export stage asks for;
- ``targets/``: the edge runtimes (ORT format, OpenVINO, LiteRT, ExecuTorch): their registry,
  converters, and one loader per runtime (``targets/runners``) that imports only numpy and it;
- ``edge``: every exported variant converted to every edge target, kept where parity holds;
- ``bundle``: the deploy folder (models, metadata, samples, README, checksums);
- ``verify``: the bundle checked in fresh processes (``python -m compress.verify``);
- ``runtimes``: how the benchmark runs a variant's shipped file in each runtime.

Nothing is imported here, so ``compress.verify`` stays free of torch.
"""
