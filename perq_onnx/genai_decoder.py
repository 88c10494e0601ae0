"""The decoder in onnxruntime's fused LLM form, rebuilt from a rewritten graph (see genai.py).

``build_decoder(graph, structure, config)`` reads the weights of the graph as perq-onnx rewrote it
by the analysis records' node names and emits the decoder with SimplifiedLayerNormalization /
SkipSimplifiedLayerNormalization, GroupQueryAttention (KV cache, rotary inside, cos/sin caches
from the source, genai_source.py), MatMulNBits for INT4 blocks (or, with ``int8_linears``,
DynamicQuantizeMatMul over INT8 weights that onnxruntime widens from the INT4 file when it loads
the model) and the online rotation as standard ops. A projection that is a column range of a fused weight (onnxruntime-genai's builder's
packed qkv_proj) is read as those columns of it and packed again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from .genai_source import GenaiError, ModelConfig, source_rope_caches
from .hadamard import hadamard
from .shapes import constant_value as _value  # Identity / Transpose / Constant nodes followed
from .shapes import producer as _producer

__all__ = ["BlockInt4", "GenaiError", "ModelConfig", "build_decoder", "check_structure", "int8_columns", "int8_weight"]

MS = "com.microsoft"
OPSET = 21
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class BlockInt4:
    """A weight W ~ (codes - zero) * scale in blocks of ``block`` rows: codes [K, N] in 0..15
    (uint8 array), scale and zero [ceil(K / block), N] (zero 8 for the symmetric form; a ragged
    last block is shorter)."""
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape


# --------------------------------------------------------------------------- reading the graph

def _need(tensor: gs.Tensor, what: str) -> np.ndarray:
    value = _value(tensor)
    if value is None:
        raise GenaiError(f"{what} ('{tensor.name}') is not a constant")
    return value


class _Reader:
    """Weights and parameters of the rewritten graph, looked up by the analysis records' names."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.nodes = {n.name: n for n in graph.nodes}

    def node(self, name: str) -> gs.Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise GenaiError(f"node '{name}' of the analysis is not in the graph (was the graph analysed before "
                             "it was rewritten, with the same node names?)") from None

    def weight(self, lin) -> np.ndarray | BlockInt4:
        """lin's [in, out] weight; a column range of a fused weight: those columns of it."""
        w = self._whole(lin.fused or lin)
        if lin.columns is None:
            return w
        a, b = lin.columns
        if isinstance(w, BlockInt4):  # blocks run along the rows: the columns are independent
            return BlockInt4(w.codes[:, a:b], w.scale[:, a:b], w.zero[:, a:b], w.block)
        return np.ascontiguousarray(w[:, a:b])

    def _whole(self, lin) -> np.ndarray | BlockInt4:
        w = self.node(lin.name).inputs[1]
        dq = _producer(w)
        if dq is not None and dq.op == "DequantizeLinear":
            return self._block_int4(dq, lin.name, (lin.in_features, lin.out_features))
        value = _need(w, f"the weight of '{lin.name}'")
        if value.shape != (lin.in_features, lin.out_features):
            raise GenaiError(f"node '{lin.name}': weight of shape {value.shape}, expected "
                             f"{(lin.in_features, lin.out_features)}")
        return np.ascontiguousarray(value, dtype=np.float32)

    def _block_int4(self, dq: gs.Node, what: str, shape: tuple[int, int]) -> BlockInt4:
        """The INT4 blocks of a [K, N] weight's DequantizeLinear (codes, scales, zero points)."""
        codes = _need(dq.inputs[0], f"the codes of '{what}'")
        scale = _need(dq.inputs[1], f"the scales of '{what}'")
        zp = _need(dq.inputs[2], f"the zero point of '{what}'") if len(dq.inputs) > 2 and dq.inputs[2].name else None
        block, axis = dq.attrs.get("block_size", 0), dq.attrs.get("axis", 1)
        kind = onnx.helper.np_dtype_to_tensor_dtype(codes.dtype)
        if kind not in (TensorProto.INT4, TensorProto.UINT4):
            raise GenaiError(f"node '{dq.name}': {codes.dtype} weights; MatMulNBits here takes INT4/UINT4 blocks")
        if axis != 0 or not block or block < 16 or block & (block - 1):
            raise GenaiError(f"node '{dq.name}': MatMulNBits needs blocks of a power of two >= 16 input rows "
                             f"(axis 0); this weight has axis {axis}, block_size {block}")
        k, n = codes.shape
        blocks = -(-k // block)
        if (k, n) != shape or scale.shape != (blocks, n) or (
                zp is not None and zp.shape != scale.shape):
            raise GenaiError(f"node '{dq.name}': codes {codes.shape} / scales {scale.shape} do not form blocks of "
                             f"{block} rows")
        offset = 8 if kind == TensorProto.INT4 else 0  # MatMulNBits' codes are unsigned (zero point 8 by default)
        zero = np.full(scale.shape, offset, np.int32) if zp is None else np.asarray(zp).astype(np.int32) + offset
        return BlockInt4((np.asarray(codes).astype(np.int32) + offset).astype(np.uint8),
                         np.asarray(scale, dtype=np.float32), zero.astype(np.uint8), int(block))

    def bias(self, lin) -> np.ndarray | None:
        if lin.bias is None:
            return None
        b = np.asarray(_need(self.node(lin.bias).inputs[lin.bias_index], f"the bias of '{lin.name}'"), np.float32)
        return b[lin.columns[0]:lin.columns[1]] if lin.columns else b

    def norm(self, norm) -> tuple[np.ndarray | None, float]:
        """(gamma or None, epsilon) of an RMSNorm record (decomposed, or onnxruntime's fused op)."""
        gamma, eps = None, None
        if norm.gamma is not None:
            node = self.node(norm.gamma)
            if node.op == "Mul":
                values = [v for v in (_value(t) for t in node.inputs) if v is not None]
                if len(values) != 1:
                    raise GenaiError(f"node '{node.name}': the gamma Mul has no single constant operand")
                gamma = values[0]
            elif node.op in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
                gamma = _need(node.inputs[1 if node.op == "SimplifiedLayerNormalization" else 2], "a norm's gamma")
                eps = float(node.attrs.get("epsilon", 1e-5))
            else:
                raise GenaiError(f"node '{node.name}': {node.op} as a norm's gamma is not supported")
        if eps is None:
            for name in norm.nodes:
                node = self.nodes.get(name)
                if node is not None and node.op in ("SimplifiedLayerNormalization",
                                                    "SkipSimplifiedLayerNormalization"):
                    eps = float(node.attrs.get("epsilon", 1e-5))
                elif node is not None and node.op == "Add":
                    scalars = [v for v in (_value(t) for t in node.inputs) if v is not None and v.size == 1]
                    if scalars:
                        eps = float(scalars[0].reshape(-1)[0])
        if eps is None:
            raise GenaiError(f"norm '{norm.name}': no epsilon found")
        if gamma is not None:
            gamma = np.asarray(gamma, dtype=np.float32).reshape(-1)
        return gamma, eps

    def refuse_rotated_readers(self, structure) -> None:
        """GenaiError naming the node where an online rotation feeds q/k/v or gate/up (the online
        residual rotation): the fused decoder has no rotation there, and dropping it would be wrong."""
        for layer in structure.layers:
            for lin in (layer.q, layer.gate):  # q/k/v share one normed input, gate/up another
                node = _producer(self.node((lin.fused or lin).name).inputs[0])
                if node is not None and node.domain == "perq":
                    raise GenaiError(f"node '{node.name}': perq.{node.op} in front of '{lin.name}' (an online residual "
                                     "rotation); the genai decoder has no rotation there: build the input with "
                                     "--residual-rotation full or none")

    def online_rotation(self, layer) -> tuple[str, object]:
        """('none', None), ('block', b) or ('full', matrix) in front of layer's down_proj."""
        x = self.node(layer.down.name).inputs[0]
        node = _producer(x)
        if node is None:
            return "none", None
        if node.domain == "perq" and node.op == "BlockHadamard":
            return "block", int(node.attrs["block_size"])
        if node.op == "MatMul":
            m = _value(node.inputs[1])
            if m is not None and m.ndim == 2 and m.shape[0] == m.shape[1] == layer.down.in_features:
                return "full", np.asarray(m, dtype=np.float32)
        if node.op == "Reshape":  # the inlined body: Reshape [-1, b] -> MatMul(H_b) -> Reshape back
            mm = _producer(node.inputs[0])
            if mm is not None and mm.op == "MatMul":
                h = _value(mm.inputs[1])
                if h is None and _producer(mm.inputs[1]) is not None and _producer(mm.inputs[1]).op == "CastLike":
                    h = _value(_producer(mm.inputs[1]).inputs[0])
                if h is not None and h.ndim == 2 and h.shape[0] == h.shape[1] and \
                        np.allclose(h, hadamard(h.shape[0], np.float32), atol=1e-6):
                    return "block", int(h.shape[0])
            raise GenaiError(f"node '{node.name}': an unrecognised Reshape in front of '{layer.down.name}'")
        if node.op != "Mul":
            raise GenaiError(f"node '{node.name}': {node.op} in front of '{layer.down.name}' is neither the SiLU "
                             "gating Mul nor an online rotation")
        return "none", None

    def lm_head_map(self, lm) -> np.ndarray | None:
        """The hidden x hidden matrix in front of lm_head (passes/tie_lm_head.py), or None."""
        node = _producer(self.node(lm.name).inputs[0])
        if node is None or node.op != "MatMul":
            return None
        m = _value(node.inputs[1])
        if m is None or m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[1] != lm.in_features:
            raise GenaiError(f"node '{node.name}': a MatMul in front of lm_head that is not a square constant map")
        return np.asarray(m, dtype=np.float32)

    def embedding(self, name: str, lm_head: str, hidden: int):
        """('float', table), ('int8', codes, row scales), ('int4', BlockInt4 [hidden, vocab]) or
        ('tied',) (gathered from lm_head's weight) of the token-embedding Gather."""
        gather = self.node(name)
        transpose = _producer(gather.inputs[0])
        if transpose is not None and transpose.op == "Transpose":
            if transpose.inputs[0] is self.node(lm_head).inputs[1]:
                return ("tied",)
            dq = _producer(transpose.inputs[0])
            if dq is None or dq.op != "DequantizeLinear":
                raise GenaiError(f"node '{transpose.name}': the embedding gathers a transposed tensor that is "
                                 "neither lm_head's weight nor INT4 blocks")
            codes = _need(dq.inputs[0], "the embedding's codes")
            return "int4", self._block_int4(dq, name, (hidden, codes.shape[1]))
        table = _need(gather.inputs[0], "the embedding table")
        if np.issubdtype(table.dtype, np.floating):
            return "float", np.asarray(table, dtype=np.float32)
        if table.dtype != np.int8:
            raise GenaiError(f"node '{name}': a {table.dtype} embedding table is not supported")
        out = gather.outputs[0]
        cast = next((c for c in out.outputs if c.op == "Cast"), None)
        mul = next((c for c in cast.outputs[0].outputs if c.op == "Mul"), None) if cast else None
        if mul is None:
            raise GenaiError(f"node '{name}': the INT8 embedding is not dequantized by Cast -> Mul")
        other = mul.inputs[1] if mul.inputs[0] is cast.outputs[0] else mul.inputs[0]
        unsq = _producer(other)
        gs_scale = _producer(unsq.inputs[0]) if unsq is not None and unsq.op == "Unsqueeze" else None
        if gs_scale is None or gs_scale.op != "Gather":
            raise GenaiError(f"node '{mul.name}': the INT8 embedding's row scales are not gathered by token")
        scale = np.asarray(_need(gs_scale.inputs[0], "the embedding's row scales"), dtype=np.float32)
        return "int8", np.asarray(table), scale


# ---------------------------------------------------------------------------------- emitting

class _Builder:
    def __init__(self, accuracy_level: int):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.accuracy_level = accuracy_level
        self._names: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        assert name not in self._names, name
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def shared(self, name: str, value: np.ndarray) -> str:
        """A constant every layer reads (added once)."""
        return name if name in self._names else self.const(name, value)

    def op(self, op_type: str, inputs, name: str, outputs: int | list[str] = 1, domain: str = "", **attrs):
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain or None,
                                           **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def linear(self, x: str, weight, bias, name: str, output: str | None = None, int8: bool = False,
               per_token: bool = False) -> str:
        """x @ weight (+ bias); INT4 blocks by MatMulNBits, or with int8 by ``int8_matmul``."""
        if isinstance(weight, BlockInt4) and int8:
            y = self.int8_matmul(x, weight, name, output if bias is None else None, per_token)
        elif isinstance(weight, BlockInt4):
            k, n = weight.shape
            y = self.op("MatMulNBits", [x, *self.nbits_constants(weight, name)],
                        f"{name}/MatMulNBits", domain=MS, K=k, N=n, bits=4, block_size=weight.block,
                        accuracy_level=self.accuracy_level, outputs=[output] if output and bias is None else 1)
        else:
            y = self.op("MatMul", [x, self.const(f"{name}.weight", weight)], f"{name}/MatMul",
                        outputs=[output] if output and bias is None else 1)
        if bias is not None:
            y = self.op("Add", [y, self.const(f"{name}.bias", bias)], f"{name}/Add", outputs=[output] if output else 1)
        return y

    def nbits_constants(self, weight: BlockInt4, name: str, as_uint4: bool = False) -> list[str]:
        """The initializers of `name`'s INT4 blocks in MatMulNBits' layout (``_matmulnbits_layout``):
        codes, scales and, unless all are 8, packed zero points. Every kernel reads these same
        bytes, so the folder's graphs can share one weight file; with `as_uint4` the packed codes
        and zero points are typed as the UINT4 values they hold (codes [N, blocks, b], zero points
        [N, blocks rounded up to even]), the same bytes."""
        codes, scales, zero = _matmulnbits_layout(weight)
        if as_uint4:
            n, blocks, half = codes.shape
            codes = _uint4(codes, (n, blocks, 2 * half))
            zero = None if zero is None else _uint4(zero, (n, 2 * zero.shape[1]))
        names = [self.const(f"{name}.weight_Q4", codes), self.const(f"{name}.weight_scales", scales)]
        if zero is not None:
            names.append(self.const(f"{name}.weight_zero_points", zero))
        return names

    def int8_matmul(self, x: str, weight: BlockInt4, name: str, output: str | None, per_token: bool = False) -> str:
        """x @ W over INT8 weights that onnxruntime computes when it loads the model (constant
        folding), so the file stays 4-bit: W's MatMulNBits bytes read as UINT4 codes (``nbits_constants``),
        widened to INT8 with one scale per column as ``int8_columns`` describes. onnxruntime keeps
        every folded intermediate until the session is built, so the chain is short in bytes: Cast
        to float, Mul, Add, Round, Cast to int8, Reshape, Transpose: 19 bytes a weight while the
        model loads (uint8 weights with a zero point would save the Round, but onnxruntime's
        u8 x u8 GEMM made SmolLM2's prompts about 1.5x slower here; README). x is quantized to uint8 with one scale per call
        (DynamicQuantizeMatMul), or with ``per_token`` one symmetric scale per token, max|x| / 127
        (standard ops and MatMulInteger)."""
        k, n = weight.shape
        blocks, b = weight.scale.shape[0], weight.block
        codes, scales, *zero = self.nbits_constants(weight, name, as_uint4=True)
        p = f"{name}/int8"
        last = self.shared("last_axis", np.array([-1], np.int64))
        col = self.const(f"{name}.weight_scale", int8_column_scale(weight))                  # [N]
        ratio_t = self.op("Unsqueeze", [self.op("Div", [scales, self.op("Unsqueeze", [col, last], f"{p}/Unsqueeze")],
                                                f"{p}/ratio"), last], f"{p}/Unsqueeze_1")    # [N, blocks, 1]
        if zero:
            z = self.op("Cast", [zero[0]], f"{p}/zero/Cast", to=TensorProto.FLOAT)
            if blocks % 2:
                z = self.op("Slice", [z, self.shared("zero_int64", np.array([0], np.int64)),
                                      self.const(f"{name}.blocks", np.array([blocks], np.int64)),
                                      self.shared("one_int64", np.array([1], np.int64))], f"{p}/zero/Slice")
            z = self.op("Unsqueeze", [z, last], f"{p}/zero/Unsqueeze")
        else:
            z = self.shared("float_8", np.array(8, np.float32))
        offset_t = self.op("Neg", [self.op("Mul", [z, ratio_t], f"{p}/zero_ratio")], f"{p}/offset")
        u = self.op("Cast", [codes], f"{p}/Cast", to=TensorProto.FLOAT)                     # [N, blocks, b]
        w = self.op("Round", [self.op("Add", [self.op("Mul", [u, ratio_t], f"{p}/Mul"), offset_t], f"{p}/Add")],
                    f"{p}/Round")
        w = self.op("Cast", [w], f"{p}/Cast_1", to=TensorProto.INT8)
        w = self.op("Reshape", [w, self.const(f"{name}.weight_rows", np.array([n, blocks * b], np.int64))], f"{p}/Reshape")
        if blocks * b != k:  # a ragged last block's padding
            w = self.op("Slice", [w, self.shared("zero_int64", np.array([0], np.int64)),
                                  self.const(f"{name}.weight_k", np.array([k], np.int64)),
                                  self.shared("one_int64", np.array([1], np.int64))], f"{p}/Slice")
        w = self.op("Transpose", [w], f"{p}/Transpose", perm=[1, 0])                          # [K, N] int8
        if not per_token:
            return self.op("DynamicQuantizeMatMul", [x, w, col], f"{name}/DynamicQuantizeMatMul", domain=MS,
                           outputs=[output] if output else 1)
        p = f"{name}/per_token"
        amax = self.op("ReduceMax", [self.op("Abs", [x], f"{p}/Abs"), self.shared("last_axis", np.array([-1], np.int64))],
                       f"{p}/ReduceMax", keepdims=1)
        step = self.op("Div", [self.op("Max", [amax, self.shared("tiny_float", np.array(1e-30, np.float32))], f"{p}/Max"),
                               self.shared("int8_max_float", np.array(127, np.float32))], f"{p}/step")
        codes = self.op("Round", [self.op("Div", [x, step], f"{p}/Div")], f"{p}/Round")
        uint8 = self.shared("uint8_zero_float", np.array(128, np.float32))   # |codes| <= 127: 1..255 as uint8
        codes = self.op("Cast", [self.op("Add", [codes, uint8], f"{p}/Add")], f"{p}/Cast", to=TensorProto.UINT8)
        y = self.op("MatMulInteger", [codes, w, self.shared("uint8_zero", np.array(128, np.uint8))],
                    f"{name}/MatMulInteger")
        y = self.op("Mul", [self.op("Cast", [y], f"{p}/Cast_1", to=TensorProto.FLOAT), step], f"{p}/Mul")
        return self.op("Mul", [y, col], f"{p}/Mul_1", outputs=[output] if output else 1)

    def gathered_int4(self, weight, name: str, hidden: int, own: bool = False) -> str:
        """Token rows gathered from INT4 blocks [hidden, vocab] by GatherBlockQuantized: the
        MatMulNBits bytes of linear `name` (built later by ``linear``), or with ``own`` a table of
        the same layout written here, [N, blocks, b/2] read through a Reshape as [N, blocks * b / 2]
        rows (GatherBlockQuantized straight on an initializer decoded 11% slower per token in
        og.Generator here); scales and zero points in MatMulNBits' layout; a ragged last block's
        padding is sliced off."""
        if not isinstance(weight, BlockInt4):
            raise GenaiError(f"'{name}': the embedding gathers INT4 block codes; this weight is float")
        n, blocks, b = weight.shape[1], weight.scale.shape[0], weight.block
        if own:
            self.nbits_constants(weight, name)
        rows = self.op("Reshape", [f"{name}.weight_Q4", self.const(f"{name}.weight_Q4_rows",
                                                                     np.array([n, blocks * b // 2], np.int64))],
                       "embed_tokens/Reshape")
        inputs = [rows, "input_ids", f"{name}.weight_scales"]
        if np.any(weight.zero != 8):
            inputs.append(f"{name}.weight_zero_points")
        h = self.op("GatherBlockQuantized", inputs, "embed_tokens/GatherBlockQuantized", domain=MS, bits=4,
                    block_size=b, gather_axis=0, quantize_axis=1)
        if blocks * b != hidden:
            h = self.op("Slice", [h, self.const("embed_tokens.slice_start", np.array([0], np.int64)),
                                  self.const("embed_tokens.slice_end", np.array([hidden], np.int64)),
                                  self.const("embed_tokens.slice_axis", np.array([-1], np.int64))],
                        "embed_tokens/Slice")
        return h


def _padded_codes(weight: BlockInt4) -> np.ndarray:
    """The codes [blocks * b, N], 0..15, a ragged last block padded with its zero point (decodes to 0)."""
    u = np.repeat(weight.zero, weight.block, axis=0)
    u[:weight.shape[0]] = weight.codes
    return u


def _matmulnbits_layout(weight: BlockInt4):
    """(codes [N, blocks, b/2] two per byte, scales [N, blocks], packed zero points or None when
    all are MatMulNBits' default 8) of INT4 blocks [K, N]."""
    n = weight.shape[1]
    b, blocks = weight.block, weight.scale.shape[0]
    u = np.ascontiguousarray(_padded_codes(weight).T).reshape(n, blocks, b)  # [N, blocks, b]
    zero = None
    if np.any(weight.zero != 8):
        zero = _nibbles(np.pad(weight.zero.T, ((0, 0), (0, blocks % 2)), constant_values=8))
    return _nibbles(u), np.ascontiguousarray(weight.scale.T), zero


@dataclass(frozen=True)
class Int8Columns:
    """INT4 blocks as 8-bit weights with one scale per column (``int8_columns``), in MatMulNBits'
    orientation: codes [N, blocks, b], zero / ratio / offset [N, blocks, 1], scale [N]."""
    codes: np.ndarray
    zero: np.ndarray
    ratio: np.ndarray
    offset: np.ndarray
    scale: np.ndarray


def int8_columns(weight: BlockInt4) -> Int8Columns:
    """INT4 blocks [K, N] as W8 = round((codes - zero) * ratio) with W ~ W8 * scale, where scale =
    max over blocks of |block scale| * max(zero, 15 - zero), / 127 (a bound of the block's largest
    |code - zero|, so it comes from the scales and zero points alone) and ratio = block scale /
    scale: |W8| <= 127, each value within half an INT8 step of the INT4 weight. The float32
    arithmetic is what ``_Builder.int8_matmul``'s nodes do: ratio = scales / scale, offset =
    -(zero * ratio), W8 = round(codes * ratio + offset) (half to even)."""
    n = weight.shape[1]
    b, blocks = weight.block, weight.scale.shape[0]
    codes = np.ascontiguousarray(_padded_codes(weight).T).reshape(n, blocks, b)
    zero = np.ascontiguousarray(weight.zero.T).astype(np.float32)[..., None]
    scale = int8_column_scale(weight)
    ratio = (weight.scale.T / scale[:, None])[..., None].astype(np.float32)
    offset = -(zero * ratio)
    return Int8Columns(codes, zero, ratio, offset.astype(np.float32), scale)


def int8_column_scale(weight: BlockInt4) -> np.ndarray:
    """``int8_columns``' scale [N] from the block scales and zero points alone."""
    bound = np.maximum(weight.zero, 15 - weight.zero).astype(np.float32)            # [blocks, N]
    scale = (np.abs(weight.scale) * bound).max(axis=0) / np.float32(127)
    return np.where(scale > 0, scale, np.float32(1)).astype(np.float32)


def int8_weight(weight: BlockInt4) -> np.ndarray:
    """The [K, N] INT8 values ``int8_columns`` describes (the reference for what onnxruntime folds)."""
    c = int8_columns(weight)
    w = np.round(c.codes.astype(np.float32) * c.ratio + c.offset).astype(np.int8)
    return np.ascontiguousarray(w.reshape(w.shape[0], -1)[:, :weight.shape[0]].T)


def _uint4(packed: np.ndarray, shape) -> np.ndarray:
    """Bytes of two 4-bit values each (the low nibble first) as the UINT4 array of `shape` they hold."""
    u = np.stack([packed & 15, packed >> 4], axis=-1).reshape(shape)
    return u.astype(ml_dtypes.uint4)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit values along the last axis in one byte each, the first in the low nibble."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _pack(weights: list, biases: list):
    """Linears reading one input (q, k, v) as one, columns concatenated, when their forms agree,
    else None."""
    if all(isinstance(w, np.ndarray) for w in weights):
        w = np.concatenate(weights, axis=1)
    elif all(isinstance(w, BlockInt4) for w in weights) and len({w.block for w in weights}) == 1:
        w = BlockInt4(*(np.concatenate([getattr(w, f) for w in weights], axis=1) for f in ("codes", "scale", "zero")),
                      weights[0].block)
    else:
        return None
    if all(b is None for b in biases):
        return w, None
    return w, np.concatenate([b if b is not None else np.zeros(wi.shape[1], np.float32)
                              for b, wi in zip(biases, weights)])


def check_structure(structure) -> None:
    """Refuse a structure the genai form cannot express (a GenaiError naming the layer)."""
    if structure.float_type != TensorProto.FLOAT:
        raise GenaiError("the genai form is written for float32 graphs; this one is "
                         f"{onnx.helper.tensor_dtype_to_np_dtype(structure.float_type)}")
    for layer in structure.layers:
        if layer.attn_output_norm is not None or layer.mlp_output_norm is not None:
            raise GenaiError(f"layer {layer.index}: output norms (post-norm models) are not supported in the genai "
                             "form")


def _mlp_norm(layer):
    """The MLP's pre-norm (records name it mlp_norm; older ones post_norm)."""
    return getattr(layer, "mlp_norm", None) or getattr(layer, "post_norm")


def build_decoder(graph: gs.Graph, structure, config: ModelConfig, accuracy_level: int = 4,
                  int8_linears: bool = False) -> onnx.ModelProto:
    """The decoder of the rewritten graph in onnxruntime's fused LLM form (module docstring).
    int8_linears: every decoder linear by ``_Builder.int8_matmul``, down_proj with one scale per
    token (its input has tokens of outlying magnitude that one scale per call cannot take: SmolLM2
    valid ppl 29.99 that way, 24.76 per token); lm_head stays MatMulNBits (it decodes faster in 4
    bits)."""
    check_structure(structure)
    r = _Reader(graph)
    r.refuse_rotated_readers(structure)
    layers = structure.layers
    d = structure.head_dim
    heads, kv_heads = layers[0].num_heads, layers[0].num_kv_heads
    hidden = structure.hidden_size
    if config.raw.get("head_dim") not in (None, d):
        raise GenaiError(f"config.json head_dim {config.raw['head_dim']} differs from the graph's {d}")
    b = _Builder(accuracy_level)

    # attention mask -> GroupQueryAttention's seqlens_k [batch] and total_sequence_length (scalar)
    one = b.const("one_int64", np.array([1], np.int64))
    total_len = b.op("ReduceSum", ["attention_mask", one], "mask/ReduceSum", keepdims=0)
    seqlens_k = b.op("Cast", [b.op("Sub", [total_len, one], "mask/Sub")], "mask/seqlens_k", to=TensorProto.INT32)
    width = b.op("Gather", [b.op("Shape", ["attention_mask"], "mask/Shape"), b.const("index_1", np.array(1, np.int64))],
                 "mask/Gather", axis=0)
    total = b.op("Cast", [width], "mask/total_sequence_length", to=TensorProto.INT32)

    cos, sin = source_rope_caches(graph, config, d)
    cos_cache, sin_cache = b.const("cos_cache", cos), b.const("sin_cache", sin)

    lm = structure.lm_head
    lm_weight = r.weight(lm)  # read once: a tied embedding gathers from it too
    kind = r.embedding(structure.embedding, lm.name, hidden)
    if kind[0] == "tied":
        h = b.gathered_int4(lm_weight, "lm_head", hidden)
    elif kind[0] == "int4":
        h = b.gathered_int4(kind[1], "embed_tokens", hidden, own=True)
    elif kind[0] == "float":
        h = b.op("Gather", [b.const("embed_tokens.weight", kind[1]), "input_ids"], "embed_tokens/Gather")
    else:
        rows = b.op("Gather", [b.const("embed_tokens.int8", kind[1]), "input_ids"], "embed_tokens/Gather")
        rows = b.op("Cast", [rows], "embed_tokens/Cast", to=TensorProto.FLOAT)
        s = b.op("Gather", [b.const("embed_tokens.scale", kind[2]), "input_ids"], "embed_tokens/scales")
        s = b.op("Unsqueeze", [s, b.shared("last_axis", np.array([-1], np.int64))], "embed_tokens/Unsqueeze")
        h = b.op("Mul", [rows, s], "embed_tokens/dequantize")

    def gamma_of(norm):
        gamma, eps = r.norm(norm)
        return (gamma if gamma is not None else np.ones(hidden, np.float32)), eps

    residual, pending = h, None  # pending: the sublayer output still to be added to the residual
    for layer in layers:
        p = f"layers.{layer.index}"
        for which, norm in (("input_layernorm", layer.input_norm), ("post_attention_layernorm", _mlp_norm(layer))):
            gamma, eps = gamma_of(norm)
            g = b.const(f"{p}.{which}.weight", gamma)
            if pending is None:
                x = b.op("SimplifiedLayerNormalization", [residual, g], f"{p}/{which}", axis=-1, epsilon=eps,
                         stash_type=1)
            else:
                x, _, _, residual = b.op("SkipSimplifiedLayerNormalization", [residual, pending, g], f"{p}/{which}",
                                         outputs=[f"{p}/{which}/output_0", "", "", f"{p}/{which}/output_3"],
                                         domain=MS, epsilon=eps)
            if which == "input_layernorm":
                qkv = [layer.q, layer.k, layer.v]
                packed = _pack([r.weight(lin) for lin in qkv], [r.bias(lin) for lin in qkv])
                if packed is not None:
                    q, k, v = b.linear(x, *packed, f"{p}.attn.qkv_proj", int8=int8_linears), "", ""
                else:
                    q, k, v = (b.linear(x, r.weight(lin), r.bias(lin), f"{p}.attn.{n}_proj", int8=int8_linears)
                               for lin, n in zip(qkv, "qkv"))
                attn = b.op("GroupQueryAttention",
                            [q, k, v, f"past_key_values.{layer.index}.key", f"past_key_values.{layer.index}.value",
                             seqlens_k, total, cos_cache, sin_cache],
                            f"{p}/attn/GroupQueryAttention",
                            outputs=[f"{p}/attn/output_0", f"present.{layer.index}.key",
                                     f"present.{layer.index}.value"],
                            domain=MS, num_heads=heads, kv_num_heads=kv_heads, scale=1.0 / math.sqrt(d),
                            do_rotary=1, rotary_interleaved=0, local_window_size=-1)[0]
                pending = b.linear(attn, r.weight(layer.o), r.bias(layer.o), f"{p}.attn.o_proj", int8=int8_linears)
                continue
            # gate and up as two linears: packed into one behind a Split, decode was slower here
            gate, up = (b.linear(x, r.weight(lin), r.bias(lin), f"{p}.mlp.{n}_proj", int8=int8_linears)
                        for lin, n in zip((layer.gate, layer.up), ("gate", "up")))
            act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")], f"{p}/mlp/act_fn/Mul")
            act = b.op("Mul", [act, up], f"{p}/mlp/Mul")
            rotation, arg = r.online_rotation(layer)
            if rotation == "block":
                # [batch, seq, n] -> [batch, seq, n / b, b] and back: a 0 in Reshape's shape keeps that
                # input dimension, so no Shape op runs per layer and step
                n = layer.down.in_features
                blocks = b.op("Reshape", [act, b.shared(f"mlp.online_rotation.blocks_{n}_{arg}",
                                                       np.array([0, 0, n // arg, arg], np.int64))],
                              f"{p}/mlp/online_rotation/Reshape")
                rotated = b.op("MatMul", [blocks, b.shared(f"hadamard_{arg}", hadamard(arg, np.float32))],
                               f"{p}/mlp/online_rotation/MatMul")
                act = b.op("Reshape", [rotated, b.shared(f"mlp.online_rotation.rows_{n}", np.array([0, 0, n], np.int64))],
                           f"{p}/mlp/online_rotation/Reshape_1")
            elif rotation == "full":
                act = b.op("MatMul", [act, b.const(f"{p}.mlp.online_rotation.matrix", arg)],
                           f"{p}/mlp/online_rotation/MatMul")
            pending = b.linear(act, r.weight(layer.down), r.bias(layer.down), f"{p}.mlp.down_proj", int8=int8_linears,
                               per_token=True)
    gamma, eps = gamma_of(structure.final_norm)
    x = b.op("SkipSimplifiedLayerNormalization", [residual, pending, b.const("norm.weight", gamma)], "final_norm",
             outputs=["final_norm/output_0"], domain=MS, epsilon=eps)
    tie_map = r.lm_head_map(lm)
    if tie_map is not None:
        x = b.op("MatMul", [x, b.const("lm_head.tie_map", tie_map)], "lm_head/tie_map")
    b.linear(x, lm_weight, r.bias(lm), "lm_head", output="logits")

    n_layers = len(layers)
    cache = ["batch_size", kv_heads, "past_sequence_length", d]
    present = ["batch_size", kv_heads, "total_sequence_length", d]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", structure.vocab_size])]
    for i in range(n_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT, present))
    g = helper.make_graph(b.nodes, "perq_genai_decoder", inputs, outputs, b.initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="perq-onnx")
    model.ir_version = 10
    return model
