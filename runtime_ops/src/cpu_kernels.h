// CPU kernels of the perq ops: blockwise fast Walsh-Hadamard transform and the fused per-token
// dynamic quantize-dequantize, one row (the last axis, C channels) at a time.
#pragma once

#include <cstdint>

#include "perq_common.h"

namespace perq {
namespace cpu {

// Rows [row_begin, row_end) of x, y viewed as [rows, channels]; channels % block_size == 0.
// stream: write y with non-temporal stores (for outputs much larger than the caches).
void run_rows_f32(const float* x, float* y, int64_t channels, int64_t row_begin, int64_t row_end,
                  const OpParams& p, bool stream = false);
// float16 in and out (raw IEEE binary16 bits), computed in float32.
void run_rows_f16(const uint16_t* x, uint16_t* y, int64_t channels, int64_t row_begin, int64_t row_end,
                  const OpParams& p);

}  // namespace cpu
}  // namespace perq
