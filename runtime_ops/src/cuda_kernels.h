// Host-side entry of the CUDA kernels (implemented in cuda_kernels.cu; present when the library
// is built with PERQ_WITH_CUDA).
#pragma once

#include <cstddef>
#include <cstdint>

#include "perq_common.h"

namespace perq {
namespace cuda {

// Launches the op on `stream` (a cudaStream_t) for x, y device buffers viewed as [rows, channels].
// fp16: elements are IEEE binary16, else float32. Returns nullptr on success, else a static
// message (the launch error's text).
const char* launch(const void* x, void* y, int64_t rows, int64_t channels, const OpParams& p, bool fp16,
                   void* stream);

}  // namespace cuda
}  // namespace perq
