// onnxruntime custom-op library for the perq domain, version 1:
//
//   BlockHadamard(X; block_size) -> Y
//   BlockHadamardQuantize(X; block_size, bits, symmetric) -> Y
//   BlockHadamardQuantizeFP4(X; block_size, format, tensor_scale) -> Y
//
// semantics: perq_onnx/functions.py. Kernels for float32 and float16 on the CPU execution provider
// and, when built with CUDA, on the CUDA execution provider. Written against the plain C API
// (OrtCustomOp), requesting API version 17 (onnxruntime >= 1.17), so the library does not link
// against libonnxruntime: onnxruntime hands its API table to RegisterCustomOps.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

#include "cpu_kernels.h"
#include "perq_common.h"
#if defined(PERQ_WITH_CUDA)
#include "cuda_kernels.h"
#endif

#if defined(_WIN32)
#define PERQ_EXPORT __declspec(dllexport)
#else
#define PERQ_EXPORT __attribute__((visibility("default")))
#endif

namespace perq {
namespace {

// 17: KernelContext_ParallelFor, shape inference and GetStartVersion/GetEndVersion in OrtCustomOp.
constexpr uint32_t kApiVersion = 17;
static_assert(kApiVersion <= ORT_API_VERSION, "onnxruntime headers are older than the API version requested");

constexpr const char* kDomain = "perq";
constexpr const char* kCudaEp = "CUDAExecutionProvider";

struct Kernel {
  const OrtApi* api;
  OpParams params;
  bool fp16;
  bool cuda;
};

// Op description: one instance per (op type, element type, execution provider).
enum class Quantizer { kNone, kInt, kFp4 };

struct PerqOp : OrtCustomOp {
  const char* name;
  ONNXTensorElementDataType type;
  Quantizer quantizer;
  bool cuda;
  PerqOp(const char* name_, ONNXTensorElementDataType type_, Quantizer quantizer_, bool cuda_);
};

const PerqOp* self(const OrtCustomOp* op) { return static_cast<const PerqOp*>(op); }

OrtStatus* error(const OrtApi* api, const std::string& msg) { return api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str()); }

OrtStatus* get_int(const OrtApi* api, const OrtKernelInfo* info, const char* op, const char* name, int64_t* out) {
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, out);
  if (st) {
    api->ReleaseStatus(st);
    return error(api, std::string("perq.") + op + ": missing integer attribute '" + name + "'");
  }
  return nullptr;
}

// The FP4 attributes: format "nvfp4" or "mxfp4"; NVFP4's tensor_scale, a positive finite float.
OrtStatus* get_fp4(const OrtApi* api, const OrtKernelInfo* info, const char* op, OpParams* p) {
  size_t size = 0;  // the first call asks for the size (terminating zero included)
  OrtStatus* st = api->KernelInfoGetAttribute_string(info, "format", nullptr, &size);
  std::string format(size, '\0');
  if (!st && size) st = api->KernelInfoGetAttribute_string(info, "format", &format[0], &size);
  if (st || !size) {
    if (st) api->ReleaseStatus(st);
    return error(api, std::string("perq.") + op + ": missing string attribute 'format' (nvfp4 or mxfp4)");
  }
  format.resize(size - 1);
  if (format == "nvfp4") {
    p->fp4 = Fp4::kNvfp4;
  } else if (format == "mxfp4") {
    p->fp4 = Fp4::kMxfp4;
  } else {
    return error(api, std::string("perq.") + op + ": format must be nvfp4 or mxfp4, got '" + format + "'");
  }
  if (p->fp4 == Fp4::kNvfp4) {
    float ts = 0.f;
    if ((st = api->KernelInfoGetAttribute_float(info, "tensor_scale", &ts))) {
      api->ReleaseStatus(st);
      return error(api, std::string("perq.") + op + ": nvfp4 needs the float attribute 'tensor_scale'");
    }
    if (!(ts > 0.f) || !std::isfinite(ts))
      return error(api, std::string("perq.") + op + ": tensor_scale must be positive and finite, got " +
                            std::to_string(ts));
    p->tensor_scale = ts;
  }
  return nullptr;
}

OrtStatus* ORT_API_CALL CreateKernelV2(const OrtCustomOp* op_, const OrtApi* api, const OrtKernelInfo* info,
                                       void** kernel) {
  const PerqOp* op = self(op_);
  *kernel = nullptr;
  OpParams p;
  int64_t block = 0;
  if (OrtStatus* st = get_int(api, info, op->name, "block_size", &block)) return st;
  if (block < 2 || block > 1024 || (block & (block - 1)) != 0)
    return error(api, std::string("perq.") + op->name + ": block_size must be a power of two in 2..1024, got " +
                          std::to_string(block));
  p.block_size = static_cast<int>(block);
  while ((1 << p.log2_block) < p.block_size) ++p.log2_block;
  p.inv_sqrt_block = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
  p.quantize = op->quantizer == Quantizer::kInt;
  if (op->quantizer == Quantizer::kFp4) {
    if (OrtStatus* st = get_fp4(api, info, op->name, &p)) return st;
  }
  if (p.quantize) {
    int64_t bits = 0, symmetric = 0;
    if (OrtStatus* st = get_int(api, info, op->name, "bits", &bits)) return st;
    if (OrtStatus* st = get_int(api, info, op->name, "symmetric", &symmetric)) return st;
    if (bits != 4 && bits != 8)
      return error(api, std::string("perq.") + op->name + ": bits must be 4 or 8, got " + std::to_string(bits));
    if (symmetric != 0 && symmetric != 1)
      return error(api, std::string("perq.") + op->name + ": symmetric must be 0 or 1, got " + std::to_string(symmetric));
    p.bits = static_cast<int>(bits);
    p.symmetric = symmetric != 0;
  }
  Kernel* k = new (std::nothrow) Kernel{api, p, op->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, op->cuda};
  if (!k) return api->CreateStatus(ORT_FAIL, "perq: out of memory");
  *kernel = k;
  return nullptr;
}

void ORT_API_CALL KernelDestroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

struct CpuTask {
  const void* x;
  void* y;
  int64_t channels;
  int64_t rows;
  int64_t rows_per_task;
  const OpParams* params;
  bool fp16;
  bool stream;
};

void cpu_task(void* data, size_t index) {
  const CpuTask& t = *static_cast<const CpuTask*>(data);
  const int64_t r0 = static_cast<int64_t>(index) * t.rows_per_task;
  const int64_t r1 = std::min(t.rows, r0 + t.rows_per_task);
  if (t.fp16)
    cpu::run_rows_f16(static_cast<const uint16_t*>(t.x), static_cast<uint16_t*>(t.y), t.channels, r0, r1, *t.params);
  else
    cpu::run_rows_f32(static_cast<const float*>(t.x), static_cast<float*>(t.y), t.channels, r0, r1, *t.params,
                      t.stream);
}

#define PERQ_RETURN_IF_ERROR(expr)      \
  do {                                  \
    if (OrtStatus* _st = (expr)) return _st; \
  } while (0)

OrtStatus* ORT_API_CALL KernelComputeV2(void* kernel, OrtKernelContext* context) {
  const Kernel& k = *static_cast<const Kernel*>(kernel);
  const OrtApi* api = k.api;
  const char* name = k.params.fp4 != Fp4::kNone ? "BlockHadamardQuantizeFP4"
                     : k.params.quantize          ? "BlockHadamardQuantize"
                                                  : "BlockHadamard";

  const OrtValue* input = nullptr;
  PERQ_RETURN_IF_ERROR(api->KernelContext_GetInput(context, 0, &input));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  PERQ_RETURN_IF_ERROR(api->GetTensorTypeAndShape(input, &info));
  size_t rank = 0;
  OrtStatus* st = api->GetDimensionsCount(info, &rank);
  std::vector<int64_t> dims(rank);
  if (!st && rank) st = api->GetDimensions(info, dims.data(), rank);
  api->ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;
  if (rank == 0) return error(api, std::string("perq.") + name + ": input must have at least one axis");
  const int64_t channels = dims.back();
  if (channels % k.params.block_size != 0)
    return error(api, std::string("perq.") + name + ": last axis (" + std::to_string(channels) +
                          ") is not a multiple of block_size " + std::to_string(k.params.block_size));
  if (k.params.fp4 != Fp4::kNone && channels % k.params.fp4_group() != 0)
    return error(api, std::string("perq.") + name + ": last axis (" + std::to_string(channels) +
                          ") is not a multiple of the format's block " + std::to_string(k.params.fp4_group()));
  int64_t total = 1;
  for (int64_t d : dims) total *= d;

  OrtValue* output = nullptr;
  PERQ_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, dims.data(), rank, &output));
  if (total == 0) return nullptr;
  void* x = nullptr;
  void* y = nullptr;
  PERQ_RETURN_IF_ERROR(api->GetTensorMutableData(const_cast<OrtValue*>(input), &x));
  PERQ_RETURN_IF_ERROR(api->GetTensorMutableData(output, &y));
  const int64_t rows = total / channels;

  if (k.cuda) {
#if defined(PERQ_WITH_CUDA)
    void* stream = nullptr;
    PERQ_RETURN_IF_ERROR(api->KernelContext_GetGPUComputeStream(context, &stream));
    if (const char* msg = cuda::launch(x, y, rows, channels, k.params, k.fp16, stream))
      return api->CreateStatus(ORT_FAIL, (std::string("perq.") + name + " (CUDA): " + msg).c_str());
    return nullptr;
#else
    return api->CreateStatus(ORT_FAIL, "perq: library built without CUDA");
#endif
  }

  // Tasks of at least ~32k elements, so that small tensors stay on one thread. Outputs of 16 MiB
  // and more are written with streaming stores: they would not stay in cache for the next op.
  const bool stream = total * 4 >= (int64_t{16} << 20);
  CpuTask task{x, y, channels, rows, std::max<int64_t>(1, (int64_t{1} << 15) / channels), &k.params, k.fp16, stream};
  const int64_t n_tasks = (rows + task.rows_per_task - 1) / task.rows_per_task;
  if (n_tasks == 1) {
    cpu_task(&task, 0);
    return nullptr;
  }
  return api->KernelContext_ParallelFor(context, cpu_task, static_cast<size_t>(n_tasks), 0, &task);
}

// Y has X's type and shape. Best effort: errors are dropped, and no shape is set when X's is
// unknown (this API reports an unknown rank as rank 0, which the op does not accept anyway) or has
// an unknown dimension without a name (onnxruntime would record it as a fixed dimension of -1).
const OrtApi* g_api = nullptr;  // set by RegisterCustomOps before any op is used

OrtStatus* ORT_API_CALL InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi* api = g_api;
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  if (OrtStatus* st = api->ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) {
    api->ReleaseStatus(st);
    return nullptr;
  }
  size_t rank = 0;
  if (OrtStatus* st = api->GetDimensionsCount(info, &rank)) {
    api->ReleaseStatus(st);
    return nullptr;
  }
  if (rank == 0) return nullptr;
  std::vector<int64_t> dims(rank);
  std::vector<const char*> names(rank, nullptr);
  OrtStatus* st = api->GetDimensions(info, dims.data(), rank);
  if (!st) st = api->GetSymbolicDimensions(info, names.data(), rank);
  if (st) {
    api->ReleaseStatus(st);
    return nullptr;
  }
  for (size_t i = 0; i < rank; ++i)
    if (dims[i] < 0 && (names[i] == nullptr || names[i][0] == '\0')) return nullptr;
  if ((st = api->ShapeInferContext_SetOutputTypeShape(ctx, 0, info))) api->ReleaseStatus(st);
  return nullptr;
}

const char* ORT_API_CALL GetName(const OrtCustomOp* op) { return self(op)->name; }
const char* ORT_API_CALL GetExecutionProviderType(const OrtCustomOp* op) { return self(op)->cuda ? kCudaEp : nullptr; }
ONNXTensorElementDataType ORT_API_CALL GetType(const OrtCustomOp* op, size_t) { return self(op)->type; }
size_t ORT_API_CALL GetOne(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL GetRequired(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL GetInputMemoryType(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL GetZero(const OrtCustomOp*) { return 0; }
int ORT_API_CALL GetStartVersion(const OrtCustomOp*) { return 1; }
int ORT_API_CALL GetEndVersion(const OrtCustomOp*) { return 1; }

void* ORT_API_CALL CreateKernelV1(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*) { return nullptr; }
void ORT_API_CALL KernelComputeV1(void*, OrtKernelContext*) {}

PerqOp::PerqOp(const char* name_, ONNXTensorElementDataType type_, Quantizer quantizer_, bool cuda_)
    : OrtCustomOp(), name(name_), type(type_), quantizer(quantizer_), cuda(cuda_) {
  std::memset(static_cast<OrtCustomOp*>(this), 0, sizeof(OrtCustomOp));
  version = kApiVersion;
  CreateKernel = CreateKernelV1;  // unused: onnxruntime >= 1.16 calls CreateKernelV2
  GetName = perq::GetName;
  GetExecutionProviderType = perq::GetExecutionProviderType;
  GetInputType = GetType;
  GetInputTypeCount = GetOne;
  GetOutputType = GetType;
  GetOutputTypeCount = GetOne;
  KernelCompute = KernelComputeV1;  // unused, see KernelComputeV2
  KernelDestroy = perq::KernelDestroy;
  GetInputCharacteristic = GetRequired;
  GetOutputCharacteristic = GetRequired;
  GetInputMemoryType = perq::GetInputMemoryType;
  GetVariadicInputMinArity = GetZero;
  GetVariadicInputHomogeneity = GetZero;
  GetVariadicOutputMinArity = GetZero;
  GetVariadicOutputHomogeneity = GetZero;
  CreateKernelV2 = perq::CreateKernelV2;
  KernelComputeV2 = perq::KernelComputeV2;
  InferOutputShapeFn = InferOutputShape;
  GetStartVersion = perq::GetStartVersion;
  GetEndVersion = perq::GetEndVersion;
}

std::vector<const PerqOp*>& all_ops() {
  static std::vector<const PerqOp*> ops = [] {
    std::vector<const PerqOp*> v;
    const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16};
    const bool eps[] = {
        false,
#if defined(PERQ_WITH_CUDA)
        true,
#endif
    };
    for (bool cuda : eps)
      for (auto t : types) {
        v.push_back(new PerqOp("BlockHadamard", t, Quantizer::kNone, cuda));
        v.push_back(new PerqOp("BlockHadamardQuantize", t, Quantizer::kInt, cuda));
        v.push_back(new PerqOp("BlockHadamardQuantizeFP4", t, Quantizer::kFp4, cuda));
      }
    return v;
  }();
  return ops;
}

}  // namespace
}  // namespace perq

extern "C" {

// Registers the perq domain with the session options (the entry point that
// SessionOptions.register_custom_ops_library calls). The domains are never released: sessions
// created from these options keep pointers into them.
PERQ_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(perq::kApiVersion);
  if (!api) {
    const OrtApi* old = api_base->GetApi(1);
    std::string msg = std::string("perq_ops needs onnxruntime >= 1.17 (C API version ") +
                      std::to_string(perq::kApiVersion) + "); this is onnxruntime " + api_base->GetVersionString();
    if (old) return old->CreateStatus(ORT_FAIL, msg.c_str());
    std::fprintf(stderr, "%s\n", msg.c_str());
    return nullptr;
  }
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  perq::g_api = api;
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(perq::kDomain, &domain)) return st;
  for (const perq::PerqOp* op : perq::all_ops()) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) return st;
  }
  return api->AddCustomOpDomain(options, domain);
}

// 1 when the library holds the CUDA kernels (built with nvcc), else 0.
PERQ_EXPORT int perq_ops_has_cuda(void) {
#if defined(PERQ_WITH_CUDA)
  return 1;
#else
  return 0;
#endif
}

// Version of this op library.
PERQ_EXPORT const char* perq_ops_version(void) { return "perq_ops 0.2.0 (domain perq, opset 1)"; }

}  // extern "C"
