"""Quantization grids, packed integer modules with real kernels, sparse storage, latency measurement.

    >>> from brainsurgeon.quant import Pack, pack_, sparsify_storage_, compare_latency
    >>> rows = pack_(model, Pack(bits=4, group_size=128))          # after quantize_(..., bits=4)
    >>> swapped = sparsify_storage_(model, "csr", min_sparsity=0.9)

Importing registers the saveable module formats (``brainsurgeon.formats``) defined here.
"""

from .act import ActQuantizer, ActQuantLinear, insert_act_quant_, learn_act_scales_, remove_act_quant_
from .codes import GridCodes, codes_from_grid, recover_codes
from .dynamic import DynamicInt8Linear
from .equalize import ChannelClamp, equalize_
from .measure import Timing, compare_latency, count_macs, format_speed_table, time_call, time_model
from .pack import Pack, PackedRow, pack_, pack_module
from .packed import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from .packed_conv import PackedConv2d
from .sparse import SparseLinear, break_even, semi_structured_, sparsify_storage_
from .static import StaticInt8Linear, convert_static_int8_

__all__ = [
    "ActQuantLinear", "ActQuantizer", "insert_act_quant_", "learn_act_scales_", "remove_act_quant_",
    "StaticInt8Linear", "convert_static_int8_", "ChannelClamp", "equalize_",
    "DynamicInt8Linear", "GridCodes", "Int4WeightOnlyLinear", "Int8WeightOnlyLinear", "Pack", "PackedConv2d",
    "PackedRow", "SparseLinear", "Timing", "break_even", "codes_from_grid", "compare_latency", "count_macs",
    "format_speed_table", "pack_", "pack_module", "recover_codes", "semi_structured_", "sparsify_storage_",
    "time_call", "time_model",
]
