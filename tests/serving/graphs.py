"""What an ONNX graph holds: its operator counts and its statically quantised MatMuls."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def op_counts(onnx_path: Path) -> dict[str, int]:
    """The number of nodes of each operator type."""
    import onnx

    return dict(Counter(node.op_type for node in onnx.load(str(onnx_path)).graph.node))


def int8_matmuls(onnx_path: Path) -> int:
    """MatMuls whose two inputs are dequantised int8 (QDQ: statically quantised)."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    dequantised = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(n.op_type == "MatMul" and all(i in dequantised for i in n.input) for n in graph.node)
